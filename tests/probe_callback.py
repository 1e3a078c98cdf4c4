"""A user callback (importable by the subprocess under test): records what reached the Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl


class TrainerProbe(pl.Callback):
    def __init__(self, out: str, tag: str = "probe"):
        self.out, self.tag = Path(out), tag

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out.write_text(
            json.dumps(
                {
                    "tag": self.tag,
                    "accumulate_grad_batches": trainer.accumulate_grad_batches,
                    "profiler": type(trainer.profiler).__name__,
                    "callbacks": [type(c).__name__ for c in trainer.callbacks],
                }
            )
        )
