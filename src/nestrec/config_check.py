"""Validate a composed run config against the code it configures, before anything runs.

Every group with a ``_target_`` (data, model, trainer, strategy, logger) is checked against the
signature of the class or function it names: unknown keys (with a "did you mean"), values of the
wrong type and choices outside a ``Literal`` fail as one :class:`~nestrec.errors.ConfigError`
line naming the key, the value and what is allowed. The signatures *are* the schema — a
parameter added to a module is configurable and checked at once, with no second copy of it to
keep in sync (what structured configs would need). Keyword-forwarding ``__init__`` methods
(``**kwargs`` to ``super()``) are followed up the MRO; a target that still takes ``**kwargs``
accepts any key. The ``run`` block is checked against :class:`RunOptions`.

``nestrec.run`` composes and checks the config before Hydra starts the job (so ``--cfg job`` and
``-m`` sweeps fail on a bad value too), and again on the composed job config.
"""

from __future__ import annotations

import difflib
import inspect
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf

from nestrec.errors import ConfigError

__all__ = ["RunOptions", "check_config", "check_target_config"]

_HYDRA_KEYS = {"_target_", "_convert_", "_recursive_", "_partial_", "_args_"}
_CHECKED_GROUPS = ("data", "model", "trainer", "strategy", "logger")


@dataclass
class RunOptions:
    """The ``run:`` block of a config (what ``nestrec.run`` does after building data and model)."""

    fit: bool = True
    test: bool = True
    ckpt_path: str | None = None
    monitor: str = "val/ndcg@10"
    monitor_mode: Literal["min", "max"] = "max"
    early_stopping_patience: int | None = None


def _parameters(target: Any) -> tuple[dict[str, Any], bool]:
    """Named parameters of ``target`` (name -> type hint or ``Any``) and whether it takes ``**kwargs``."""
    target = inspect.unwrap(target)
    owners = (
        [c for c in inspect.getmro(target) if "__init__" in vars(c)] if inspect.isclass(target) else [target]
    )
    params: dict[str, Any] = {}
    for owner in owners:
        function = owner.__init__ if inspect.isclass(owner) else owner
        try:
            signature = inspect.signature(function)
        except (TypeError, ValueError):
            return params, True
        try:
            hints = typing.get_type_hints(function)
        except Exception:  # unresolvable annotations: check the keys, not the types
            hints = {}
        forwards = False
        for name, p in signature.parameters.items():
            if name == "self":
                continue
            if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                forwards = forwards or p.kind == p.VAR_KEYWORD
                continue
            params.setdefault(name, hints.get(name, Any))
        if not forwards:
            return params, False
        if not inspect.isclass(target) or owner is object or not _forwards_to_super(function):
            return params, True  # **kwargs kept for something else (DDPStrategy: DDP's options)
    return params, True


def _forwards_to_super(function: Any) -> bool:
    """Whether an ``__init__`` hands its ``**kwargs`` to ``super().__init__``."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    return re.search(r"super\(\)\.__init__\([^)]*\*\*\w+", source) is not None


def _flatten(hint: Any) -> list[Any]:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return [leaf for arg in typing.get_args(hint) for leaf in _flatten(arg)]
    return [hint]


def _describe(hint: Any) -> str:
    """``int or null``, ``one of leave_one_out, temporal`` — unions flattened, choices merged."""
    choices: list[str] = []
    kinds: list[str] = []
    for leaf in _flatten(hint):
        if typing.get_origin(leaf) is Literal:
            choices += [str(a) for a in typing.get_args(leaf) if str(a) not in choices]
        elif leaf is type(None):
            kinds.append("null")
        else:
            kinds.append(getattr(leaf, "__name__", str(leaf)))
    parts = ([f"one of {', '.join(choices)}"] if choices else []) + list(dict.fromkeys(kinds))
    return " or ".join(parts)


def _matches(value: Any, hint: Any) -> bool:
    """Whether a config value can be ``hint`` (unknown or complex hints accept anything)."""
    if hint is Any or isinstance(hint, (str, typing.TypeVar)):
        return True
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    base = origin or hint
    if base in (list, tuple, Sequence, typing.Sequence) or (
        isinstance(base, type) and issubclass(base, Sequence) and base is not str
    ):
        return isinstance(value, (list, tuple, ListConfig))
    if base in (dict, Mapping, typing.Mapping) or (isinstance(base, type) and issubclass(base, Mapping)):
        return isinstance(value, (dict, DictConfig))
    # Classes (modules, tensors, dtypes, Lightning objects...) cannot come from YAML as such;
    # a value for them is something the target converts itself.
    return value is None or not isinstance(value, (bool, int, float, str)) or not isinstance(hint, type)


def _target_name(target: Any) -> str:
    return f"{target.__module__}.{target.__qualname__}"


def check_target_config(path: str, node: DictConfig, target: Any) -> None:
    """Check the keys and values of ``node`` (the config at ``path``) against ``target``'s signature."""
    params, open_ended = _parameters(target)
    for key in node:
        if key in _HYDRA_KEYS:
            continue
        if key not in params:
            if open_ended:
                continue
            close = difflib.get_close_matches(str(key), list(params), n=1, cutoff=0.6)
            hint = f"; did you mean {path}.{close[0]}?" if close else f" (known: {', '.join(sorted(params))})"
            raise ConfigError(f"{path}.{key} is not an option of {_target_name(target)}{hint}")
        if OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
            continue
        value = node[key]
        plain = (
            OmegaConf.to_container(value, resolve=False)
            if isinstance(value, (DictConfig, ListConfig))
            else value
        )
        if not _matches(plain, params[key]):
            raise ConfigError(f"{path}.{key}={plain!r} is not allowed: expected {_describe(params[key])}")


def _check_targeted(path: str, node: Any) -> None:
    """Check ``node`` against the object its ``_target_`` names (nodes without one are skipped)."""
    from hydra.utils import get_object

    if not isinstance(node, DictConfig) or not node.get("_target_"):
        return
    try:
        target = get_object(node["_target_"])
    except Exception as err:
        raise ConfigError(f"{path}._target_={node['_target_']!r} cannot be imported: {err}") from None
    check_target_config(path, node, target)


def check_config(cfg: DictConfig) -> None:
    """Check every targeted group, each callback and the ``run`` block of a composed run config."""
    for group in _CHECKED_GROUPS:
        _check_targeted(group, cfg.get(group))
    callbacks = cfg.get("callbacks")
    if isinstance(callbacks, DictConfig):
        for name, node in callbacks.items():
            _check_targeted(f"callbacks.{name}", node)
    run = cfg.get("run")
    if isinstance(run, DictConfig):
        check_target_config("run", run, RunOptions)
