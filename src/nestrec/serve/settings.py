"""Command-line settings as ``key=value`` pairs, like the project's Hydra commands.

``python -m nestrec.serve artifact=DIR port=8080 max_batch=16`` reads into :class:`ServeSettings`.
Hydra itself would add seconds of start-up and a config tree for a dozen flat settings, so this
is a small typed parser over a dataclass: unknown keys and unparsable values are one-line errors
that list what is accepted. Dotted keys (``beam.search=64``) fill dict-valued settings.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from nestrec.errors import UserInputError

__all__ = ["ServeSettings", "parse_settings", "setting", "usage"]

T = TypeVar("T")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def setting(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with a help line (shown by ``--help``)."""
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ServeSettings:
    """Settings of ``python -m nestrec.serve`` (each one is ``key=value`` on the command line)."""

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


def _convert(name: str, value: str, kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if value.lower() in ("none", "null", ""):
            return None
        return _convert(name, value, args[0])
    try:
        if kind is bool:
            if value.lower() in _TRUE:
                return True
            if value.lower() in _FALSE:
                return False
            raise ValueError(value)
        if kind in (int, float, str):
            return kind(value)
    except ValueError:
        raise UserInputError(f"{name}={value!r} is not a valid {kind.__name__}") from None
    raise TypeError(f"unsupported setting type {kind!r} for {name}")


def parse_settings(argv: list[str], cls: type[T]) -> T:
    """Parse ``key=value`` arguments into ``cls`` (a dataclass); ``a.b=v`` fills dict field ``a``."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for arg in argv:
        key, sep, raw = arg.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise UserInputError(f"expected key=value, got {arg!r}; settings: {', '.join(names)}")
        top, _, sub = key.partition(".")
        if top not in hints:
            raise UserInputError(f"unknown setting {top!r}; settings: {', '.join(names)}")
        kind = hints[top]
        if sub:
            if typing.get_origin(kind) is not dict:
                raise UserInputError(f"setting {top!r} has no sub-keys (got {key!r})")
            value_kind = typing.get_args(kind)[1]
            values.setdefault(top, {})[sub] = _convert(key, raw, value_kind)
        else:
            values[top] = _convert(key, raw, kind)
    return cls(**values)


def usage(cls: type, command: str) -> str:
    """Help text: every setting with its default and help line."""
    lines = [f"usage: {command} key=value ...", "", (cls.__doc__ or "").strip(), ""]
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        lines.append(f"  {f.name}={default}".ljust(30) + f"  {f.metadata.get('help', '')}")
    return "\n".join(lines) + "\n"
