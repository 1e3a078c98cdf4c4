"""Command settings as ``key=value`` pairs (like the project's Hydra commands) over environment
variables, validated by pydantic-settings.

``python -m nestrec.serve artifact=DIR port=8080 max_batch=16`` reads into :class:`ServeSettings`;
``NESTREC_SERVE_PORT=8080`` sets the same default from the environment (a container's usual way).
Hydra itself would add seconds of start-up and a config tree for a dozen flat settings; here the
command line is only split into ``key=value`` words, and pydantic does the typing: an unknown key
or an unparsable value is a one-line error that names it. Dotted keys (``beam.search=64``) fill
dict-valued settings.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from nestrec.errors import UserInputError

__all__ = ["CommandSettings", "ServeSettings", "parse_settings", "setting", "usage"]

T = TypeVar("T", bound="CommandSettings")


def setting(default: Any = ..., help: str = "", **kwargs: Any) -> Any:
    """A settings field with a help line (shown by ``--help``)."""
    if "default_factory" in kwargs:
        return Field(description=help, **kwargs)
    return Field(default, description=help, **kwargs)


class CommandSettings(BaseSettings):
    """Base of the ``key=value`` commands: command line > ``<env_prefix>KEY`` environment > default."""

    model_config = SettingsConfigDict(extra="forbid")


class ServeSettings(CommandSettings):
    """Settings of ``python -m nestrec.serve`` (each one is ``key=value`` on the command line, or
    ``NESTREC_SERVE_<KEY>`` in the environment)."""

    model_config = SettingsConfigDict(env_prefix="NESTREC_SERVE_", extra="forbid")

    artifact: str = setting("", "directory written by `python -m nestrec.export` (required)")
    host: str = setting("127.0.0.1", "listen address (0.0.0.0 accepts remote clients)")
    port: int = setting(8000, "listen port")
    device: str = setting("auto", "auto (CUDA when available, else CPU) | cpu | cuda | cuda:N")
    cri: str = setting("", "instruction cache: a path, `none` (no cache), or unset = the artifact's copy")
    cri_refresh_s: float = setting(60.0, "re-read the instruction cache this often (seconds)")
    max_batch: int = setting(32, "requests per forward pass; 1 disables micro-batching")
    max_batch_beams: int = setting(1024, "cap on the sum of beam widths in one batch (larger stops paying)")
    max_wait_ms: float = setting(0.0, "wait this long for a batch to fill; 0 = batch only what is queued")
    max_queue: int = setting(256, "waiting requests beyond this get 503")
    deadline_ms: int = setting(1000, "default per-request deadline in ms (504 when missed)")
    max_body_bytes: int = setting(1 << 20, "larger request bodies get 413 (default 1 MiB)")
    threads: int = setting(1, "torch intra-op threads (0 = torch's default; 1 is fastest on shared CPUs)")
    verify: bool = setting(True, "check every artifact file's SHA-256 at start-up")
    log_level: str = setting("warning", "uvicorn's log level")


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{key}={first.get('input')!r}: {first['msg'].lower()}{more}"


def parse_settings(argv: list[str], cls: type[T]) -> T:
    """Parse ``key=value`` arguments into ``cls``; ``a.b=v`` fills dict field ``a``."""
    fields = cls.model_fields
    names = ", ".join(fields)
    values: dict[str, Any] = {}
    for arg in argv:
        key, sep, raw = arg.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise UserInputError(f"expected key=value, got {arg!r}; settings: {names}")
        top, _, sub = key.partition(".")
        if top not in fields:
            raise UserInputError(f"unknown setting {top!r}; settings: {names}")
        if sub:
            if typing.get_origin(fields[top].annotation) is not dict:
                raise UserInputError(f"setting {top!r} has no sub-keys (got {key!r})")
            values.setdefault(top, {})[sub] = raw
        else:
            values[top] = raw
    try:
        return cls(**values)
    except ValidationError as err:
        raise UserInputError(_one_line(err)) from None


def usage(cls: type[CommandSettings], command: str) -> str:
    """Help text: every setting with its default and help line."""
    lines = [f"usage: {command} key=value ...", "", inspect.cleandoc(cls.__doc__ or ""), ""]
    for name, field in cls.model_fields.items():
        default = field.get_default(call_default_factory=True)
        lines.append(f"  {name}={default}".ljust(30) + f"  {field.description or ''}")
    return "\n".join(lines) + "\n"
