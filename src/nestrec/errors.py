"""Errors that mean "the user's input is wrong", reported as one line instead of a traceback.

``nestrec.run`` catches :class:`UserInputError` and exits with status 2 and ``error: <message>``;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["ConfigError", "UserInputError"]


class UserInputError(ValueError):
    """Bad data, paths or settings supplied by the user; the message names the culprit."""


class ConfigError(UserInputError):
    """A config value that composes fine but is invalid (unknown dataset, scenario, ...)."""
