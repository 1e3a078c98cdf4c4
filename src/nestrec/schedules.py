"""Learning-rate schedules shared by the models: linear warm-up, then constant or cosine to zero.

Why cosine: on a fixed epoch budget the sequence models are still improving when training stops
(they are far from converged on a CPU budget); decaying the lr to zero over that budget ends at a
better point than stopping mid-plateau at full lr. Lightning steps the scheduler every optimizer
step (``interval: step``); the total is Lightning's own estimate of the run's optimizer steps
(``max_epochs`` / ``max_steps`` aware), so an open-ended run cannot use cosine.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch

from nestrec.errors import ConfigError

__all__ = ["LR_SCHEDULES", "LRSchedule", "lr_factor", "with_schedule"]

LRSchedule = Literal["constant", "cosine"]
LR_SCHEDULES = ("constant", "cosine")


def lr_factor(schedule: str, warmup_steps: int, total_steps: float | None) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step ``t``."""
    if schedule not in LR_SCHEDULES:
        raise ConfigError(f"unknown lr_schedule {schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")
    if schedule == "cosine" and (total_steps is None or not math.isfinite(total_steps)):
        raise ConfigError("lr_schedule=cosine needs a finite trainer.max_epochs or trainer.max_steps")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1.0, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def with_schedule(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, module: Any
) -> torch.optim.Optimizer | dict:
    """What ``configure_optimizers`` returns: the bare optimizer when the lr is constant, else the
    optimizer with a per-step ``LambdaLR`` over the attached trainer's step estimate."""
    if schedule == "constant" and not warmup_steps:
        return optimizer
    trainer = getattr(module, "_trainer", None)
    total = trainer.estimated_stepping_batches if trainer is not None else None
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(schedule, warmup_steps, total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
