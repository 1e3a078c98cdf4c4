"""``PipelinedLightningModule``: the Lightning side of the NestPipe engine.

Pipelining needs the step to read batches *ahead*, so the module takes Lightning's
``dataloader_iter`` (Lightning then hands over the raw iterator) and uses manual optimisation:
the engine owns the order of lookup, All2All, backward, sparse update, dense all-reduce and
optimizer step — the same division of labour as TorchRec's ``TrainPipeline.progress``.

A subclass provides the :class:`~nestrec.pipeline.engine.PipelinedModel` contract
(``sparse_features``, ``select_samples``, ``loss_sum``) and ``sharded_tables()``; it gets a
``training_step`` that works under every strategy: under ``strategy=nestpipe`` the strategy's
pipeline schedule, elsewhere the ``sync`` schedule in one process.

Gradient clipping of dense parameters is the module's ``gradient_clip_val`` hyper-parameter
(Lightning forbids ``Trainer(gradient_clip_val=...)`` with manual optimisation); it is applied
after the all-reduce, so every schedule clips the same gradient.

An lr scheduler from ``configure_optimizers`` is stepped once per optimizer step (manual
optimisation leaves that to the module), and the row-wise sparse optimizer follows the same
factor (its lr = its configured lr × current dense lr / base dense lr), so both halves of the
model train on one schedule. The engine applies the sparse update of step *t* just before the
dense step of *t* in every pipeline mode, so every schedule sees the same lr sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from nestrec.pipeline.engine import NestPipeEngine, PipelineConfig
from nestrec.sharding.collection import ShardedEmbeddingCollection

__all__ = ["PipelinedLightningModule"]


class _Batches(Iterator):
    """Lightning's ``(batch, batch_idx, dataloader_idx)`` iterator as plain device batches."""

    def __init__(self, module: pl.LightningModule, iterator: Iterator):
        self.module, self.iterator = module, iterator

    def __next__(self) -> Any:
        batch, _, _ = next(self.iterator)
        return self.module.trainer.strategy.batch_to_device(batch)


class PipelinedLightningModule(pl.LightningModule):
    #: dense-gradient clipping (norm), applied after the all-reduce; None disables it
    gradient_clip_val: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # cooperative: may sit before another LightningModule in the MRO
        self.automatic_optimization = False
        self._engine: NestPipeEngine | None = None
        self._batches: _Batches | None = None
        self._sparse_base_lr: float | None = None

    # -- contract (see PipelinedModel) --------------------------------------------------------------
    def sharded_tables(self) -> ShardedEmbeddingCollection:
        raise NotImplementedError

    def sparse_features(self, batch: Any):
        raise NotImplementedError

    def select_samples(self, batch: Any, index: torch.Tensor) -> Any:
        raise NotImplementedError

    def loss_sum(self, batch: Any, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def loss_normalizer(self, batch: Any) -> int:
        """What the batch loss is the mean over: samples by default, tokens for sequence models."""
        return self.sparse_features(batch).batch_size

    # -- engine -------------------------------------------------------------------------------------
    @property
    def pipeline_engine(self) -> NestPipeEngine:
        if self._engine is None:
            strategy = self.trainer.strategy
            config = getattr(strategy, "pipeline_config", None) or PipelineConfig(mode="sync")
            self._engine = NestPipeEngine(
                model=self,
                collection=self.sharded_tables(),
                dense_parameters=[p for p in self.parameters() if p.requires_grad],
                dense_step=self._dense_step,
                config=config,
            )
        return self._engine

    def _dense_step(self) -> None:
        optimizer = self.optimizers()
        if self.gradient_clip_val:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler = self._scheduler()
        if scheduler is not None:
            scheduler.step()
            self._follow_schedule(scheduler, log=True)

    def _scheduler(self) -> Any | None:
        schedulers = self.lr_schedulers()
        if isinstance(schedulers, list):
            if len(schedulers) > 1:
                raise ValueError("a pipelined module supports one lr scheduler, got " + str(len(schedulers)))
            schedulers = schedulers[0] if schedulers else None
        return schedulers

    def _follow_schedule(self, scheduler: Any, log: bool = False) -> None:
        """Scale the sparse optimizer's lr by the dense scheduler's current factor (and log both)."""
        sparse = self.sharded_tables().optimizer
        if self._sparse_base_lr is None:
            self._sparse_base_lr = float(sparse.lr)
        dense_lr = float(scheduler.get_last_lr()[0])
        sparse.lr = self._sparse_base_lr * dense_lr / float(scheduler.base_lrs[0])
        if log:
            self.log_dict(
                {"train/lr": dense_lr, "train/sparse_lr": sparse.lr},
                on_step=True,
                on_epoch=False,
                batch_size=1,
            )

    def on_train_start(self) -> None:
        # After a resume the scheduler's restored state decides the sparse lr, not its config value.
        super().on_train_start()
        scheduler = self._scheduler()
        if scheduler is not None:
            self._follow_schedule(scheduler)

    def training_step(self, dataloader_iter: Iterator) -> torch.Tensor | None:
        if self._batches is None or self._batches.iterator is not dataloader_iter:
            self._batches = _Batches(self, dataloader_iter)
        engine = self.pipeline_engine
        results = engine.step(self._batches)
        fetcher = getattr(dataloader_iter, "data_fetcher", None)
        if engine.config.prefetch and fetcher is not None:
            # Lightning ends the epoch once its fetcher is done, i.e. as soon as the read-ahead has
            # taken the last batch. The epoch is done when the last batch has been *trained*: one
            # batch per step, so logging, hooks and batch counts match the sync schedule.
            fetcher.done = engine.exhausted and not engine.in_flight
        if not results:
            return None
        [result] = results  # the engine trains one batch per call
        # The loss stays a device tensor: reading it here would block the host once per step.
        loss = result.loss_tensor
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=result.batch_size)
        for key in ("step_ms", "exposed_comm_ms", "exposed_lookup_ms", "dual_buffer_rows"):
            self.log(f"pipeline/{key}", float(getattr(result, key)), batch_size=result.batch_size)
        return loss

    # -- keep the host shards current whenever something else reads them ----------------------------
    def flush_pipeline(self) -> None:
        if self._engine is not None:
            self._engine.flush()

    def on_validation_start(self) -> None:
        self.flush_pipeline()

    def on_test_start(self) -> None:
        self.flush_pipeline()

    def on_predict_start(self) -> None:
        self.flush_pipeline()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.flush_pipeline()

    def on_train_end(self) -> None:
        if self._engine is None:
            return
        self._engine.close()
        if self.trainer.is_global_zero and self._engine.config.mode != "sync":
            self.write_timeline(Path(self.trainer.default_root_dir) / "pipeline")

    def write_timeline(self, directory: Path, last_steps: int = 4) -> None:
        """Chrome trace + PNG of the last few steps, to see the overlap."""
        timeline = self._engine.timeline
        steps = sorted({s.step for s in timeline.spans()})[-last_steps:]
        if not steps:
            return
        title = f"NestPipe {self._engine.config.mode} (N={self._engine.config.num_micro_batches}), rank 0"
        timeline.write_chrome_trace(directory / "timeline.json", set(steps))
        timeline.plot(directory / "timeline.png", set(steps), title=title)
