"""Building a run's Lightning pieces from config: strategy, logger, callbacks; shared by
``nestrec.run`` (single-stage recipes) and ``nestrec.stages`` (each stage of a multi-stage one),
so neither imports the other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

__all__ = [
    "best_checkpoint",
    "build_callbacks",
    "build_logger",
    "build_strategy",
    "finish_wandb",
    "scalar",
    "split_trainer_config",
]


def build_strategy(cfg: DictConfig) -> Any:
    from hydra.utils import instantiate

    if cfg.get("_target_"):
        return instantiate(cfg)
    return cfg.get("name", "auto")


def build_logger(cfg: DictConfig | None, output_dir: Path, run_name: str, group: str | None = None) -> Any:
    """The configured Lightning logger; ``group`` ties the W&B runs of one multi-stage recipe together."""
    from hydra.utils import instantiate

    if not cfg or not cfg.get("_target_"):
        return False
    target = cfg["_target_"]
    if target.endswith("WandbLogger"):
        extra = {"group": group} if group else {}
        return instantiate(cfg, save_dir=str(output_dir), name=run_name, **extra)
    return instantiate(cfg, save_dir=str(output_dir))


def build_callbacks(
    callbacks_cfg: DictConfig | None,
    output_dir: Path,
    monitor: str | None = None,
    mode: str | None = None,
    early_stopping_patience: int | None = None,
    extra: Any = None,
) -> list:
    """The run's Lightning callbacks: the ``callbacks`` group (each entry with a ``_target_``), then
    any ``trainer.callbacks`` the user added (``extra``), then early stopping if asked for.

    A ``ModelCheckpoint`` without ``dirpath`` writes to ``output_dir/checkpoints``; ``monitor`` /
    ``mode`` retarget the ``model_checkpoint`` entry (a stage of a multi-stage recipe has its own).
    """
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    callbacks: list = []
    entries = OmegaConf.to_container(callbacks_cfg, resolve=True) if callbacks_cfg else {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or not entry.get("_target_"):
            continue
        if name == "model_checkpoint" and monitor is not None:
            entry.update(monitor=monitor, mode=mode or entry.get("mode", "max"))
        callback = instantiate(entry)
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = str(output_dir / "checkpoints")
        callbacks.append(callback)
    for entry in (
        OmegaConf.to_container(extra, resolve=True) if isinstance(extra, ListConfig) else extra or []
    ):
        callbacks.append(instantiate(entry) if isinstance(entry, dict) else entry)
    if early_stopping_patience:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode or "max", patience=early_stopping_patience))
    return callbacks


def best_checkpoint(callbacks: list) -> Any:
    """The callback that keeps the best checkpoint (the first monitored ``ModelCheckpoint``), or None."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return next((c for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None)


def split_trainer_config(trainer_cfg: DictConfig) -> tuple[DictConfig, Any]:
    """The Trainer's own config and the ``callbacks`` a user added to it (``+trainer.callbacks=[...]``)."""
    trainer_cfg = trainer_cfg.copy()
    with open_dict(trainer_cfg):
        extra = trainer_cfg.pop("callbacks", None)
    return trainer_cfg, extra


def scalar(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


def finish_wandb(logger: Any) -> None:
    """Close the W&B run so the next job of a sweep (same process) starts a fresh one."""
    if logger and type(logger).__name__ == "WandbLogger":
        import wandb

        if wandb.run is not None:
            wandb.finish()
