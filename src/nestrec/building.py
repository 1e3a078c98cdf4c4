"""Building a run's Lightning pieces from config: strategy, logger, callbacks; shared by
``nestrec.run`` (single-stage recipes) and ``nestrec.stages`` (each stage of a multi-stage one),
so neither imports the other."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

__all__ = [
    "best_checkpoint",
    "build_callbacks",
    "build_logger",
    "build_strategy",
    "finish_wandb",
    "log_artifact",
    "wandb_identity",
    "scalar",
    "split_trainer_config",
]


def build_strategy(cfg: DictConfig) -> Any:
    from hydra.utils import instantiate

    if cfg.get("_target_"):
        return instantiate(cfg)
    return cfg.get("name", "auto")


def wandb_identity(output_dir: Path, recipe: str | None) -> dict[str, Any]:
    """W&B ``group`` and ``tags`` of a run: one group per run — or per sweep, so every job of a
    ``-m`` sweep and every stage of each job land together — and the command-line overrides as tags."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    group, tags = f"{recipe}-{output_dir.parent.name}-{output_dir.name}", []
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            sweep = Path(hydra_cfg.sweep.dir)
            group = f"{recipe}-sweep-{sweep.parent.name}-{sweep.name}"
            tags.append(f"job={hydra_cfg.job.num}")
        tags += [override[:64] for override in hydra_cfg.overrides.task][:30]  # W&B: 64 chars a tag
    return {"group": group, "tags": tags}


def build_logger(
    cfg: DictConfig | None,
    output_dir: Path,
    run_name: str,
    job_type: str = "train",
    identity: dict[str, Any] | None = None,
    config: dict | None = None,
) -> Any:
    """The configured Lightning logger. For W&B: ``job_type`` names the stage, ``identity``
    (:func:`wandb_identity`) groups and tags the run, ``config`` is the whole resolved config."""
    from hydra.utils import instantiate

    if not cfg or not cfg.get("_target_"):
        return False
    target = cfg["_target_"]
    if target.endswith("WandbLogger"):
        from hydra.utils import get_class

        # Not instantiate(): its own first parameter is called ``config``, like wandb.init's.
        kwargs = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k != "_target_"}
        kwargs.update(
            save_dir=str(output_dir), name=run_name, job_type=job_type, config=config, **(identity or {})
        )
        return get_class(target)(**kwargs)
    return instantiate(cfg, save_dir=str(output_dir))


def log_artifact(logger: Any, name: str, kind: str, paths: list[Path]) -> None:
    """Attach files or directories (a sharded checkpoint is a directory) to a W&B run as one
    Artifact; other loggers keep them where they are."""
    if not logger or type(logger).__name__ != "WandbLogger":
        return
    import wandb

    paths = [Path(p) for p in paths if p and Path(p).exists()]
    if not paths:
        return
    artifact = wandb.Artifact(re.sub(r"[^A-Za-z0-9._-]", "-", name)[:128], type=kind)
    for path in paths:
        if path.is_dir():
            artifact.add_dir(str(path), name=path.name)
        else:
            artifact.add_file(str(path))
    logger.experiment.log_artifact(artifact)


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
