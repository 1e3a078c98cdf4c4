"""``NestPipeStrategy``: Lightning glue for row-sharded embedding training (``strategy="nestpipe"``).

It is DDP for the dense part — same launchers (popen, spawn, torchrun, SLURM), same all-reduce —
plus four things, in the order a run meets them:

1. ``setup_distributed``: two extra process groups, one for key routing and one for embedding
   rows/gradients, so the pipelines can overlap those collectives with the dense all-reduce
   without cross-stage ordering deadlocks. They use the accelerator's backend (NCCL on CUDA,
   HCCL on Ascend, gloo on CPU), so rows and gradients travel device to device;
   ``embedding_backend="gloo"`` routes them through host memory instead.
2. ``setup``: every ``ShardedEmbeddingCollection`` in the model is sharded for this rank *before*
   DDP wraps the model. The collections hold no ``nn.Parameter``, so DDP never averages them.
   ``table_storage`` says where the master shards live: ``host`` (pinned host memory on an
   accelerator; each batch's rows are copied into a device buffer — the paper's hierarchical
   storage) or ``device`` (whole shards on the accelerator, when they fit).
3. ``optimizer_step``: after Lightning's closure (forward, backward) and the dense optimizer step,
   the tables' summed per-row gradients go to their owners and the row-wise optimizer runs once.
4. Checkpoints are directories: Lightning's dict in ``meta.pt`` plus one shard file per rank
   (``nestrec.checkpoint``); loading reshards to the current world size.

``pipeline`` chooses how lookups and All2All are scheduled (``nestrec.pipeline.engine``):
``sync`` (every step waits for its own communication), ``dbp``, ``fwp`` or ``nested``. Models
that implement ``PipelinedLightningModule`` run every schedule: the engine replaces DDP's reducer
(the module is not wrapped; its states are broadcast once) and owns the optimizer step. Other
models with sharded tables (e.g. SASRec's ``embedding=sharded``) run ``sync`` through
``optimizer_step`` below and are refused any other schedule.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch.distributed.constants import default_pg_timeout

from nestrec.checkpoint import is_sharded_checkpoint, load_shards, save_shards
from nestrec.devices import get_device_api
from nestrec.errors import ConfigError
from nestrec.pipeline.engine import PIPELINE_MODES, PipelineConfig
from nestrec.pipeline.lightning import PipelinedLightningModule
from nestrec.sharding.collection import STORAGE_PLACES, ShardedEmbeddingCollection

__all__ = ["NestPipeStrategy", "PIPELINES"]

PIPELINES = PIPELINE_MODES


class NestPipeStrategy(DDPStrategy):
    strategy_name = "nestpipe"

    def __init__(
        self,
        pipeline: str = "sync",
        micro_batches: int = 8,
        clustering: str = "none",
        retrieval_depth: int = 2,
        host_memory_budget_gb: float | None = None,
        table_storage: str = "host",
        embedding_backend: str | None = None,
        check_host_sync: bool = False,
        accelerator=None,
        parallel_devices=None,
        cluster_environment=None,
        checkpoint_io=None,
        precision_plugin=None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: str = "popen",
        **ddp_kwargs: Any,
    ):
        # Validates every pipeline option before any process starts.
        self.pipeline_config = PipelineConfig(
            mode=pipeline,
            micro_batches=micro_batches,
            clustering=clustering,
            retrieval_depth=retrieval_depth,
            check_host_sync=check_host_sync,
        )
        if table_storage not in STORAGE_PLACES:
            raise ConfigError(
                f"strategy.table_storage={table_storage!r} is not one of {', '.join(STORAGE_PLACES)}"
            )
        self.table_storage = table_storage
        self.embedding_backend = embedding_backend
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            **ddp_kwargs,
        )
        self.host_memory_budget_gb = host_memory_budget_gb
        self.key_group = None
        self.embedding_group = None

    # -- life of a run -----------------------------------------------------------------------------
    def setup_distributed(self) -> None:
        super().setup_distributed()
        # Collective calls on a new group must be made by all ranks in the same order: here, once.
        backend = self.embedding_backend or self._get_process_group_backend()
        self.key_group = dist.new_group(backend=backend)
        self.embedding_group = dist.new_group(backend=backend)

    def _get_process_group_backend(self) -> str:
        if self._process_group_backend is None and self.root_device.type not in ("cpu", "cuda"):
            return get_device_api(self.root_device.type).backend
        return super()._get_process_group_backend()

    def sharded_collections(self) -> list[ShardedEmbeddingCollection]:
        module = self.lightning_module
        return [m for m in module.modules() if isinstance(m, ShardedEmbeddingCollection)] if module else []

    def check_shards_fit(self) -> None:
        """Refuse to start if this rank's shards (weights + optimizer state) exceed the budget."""
        if self.host_memory_budget_gb is None:
            return
        budget = self.host_memory_budget_gb * 2**30
        per_rank = 0
        for collection in self.sharded_collections():
            states = 1 + len(collection.optimizer.state_names)
            itemsize = collection.dtype.itemsize if hasattr(collection.dtype, "itemsize") else 4
            for table in collection.tables:
                rows = -(-table.num_rows // self.world_size)  # the largest shard
                per_rank += rows * table.dim * itemsize * states
        if per_rank > budget:
            needed = -(-int(per_rank * self.world_size) // int(budget))
            raise ConfigError(
                f"sharded tables need {per_rank / 2**30:.2f} GiB per rank at world size {self.world_size}, over the "
                f"host_memory_budget_gb={self.host_memory_budget_gb}; use at least {needed} ranks or smaller tables"
            )

    def setup(self, trainer: pl.Trainer) -> None:
        self.check_shards_fit()
        for collection in self.sharded_collections():
            if (
                collection.rank != self.global_rank
                or collection.world_size != self.world_size
                or collection.key_group is None
            ):
                collection.shard(
                    self.global_rank,
                    self.world_size,
                    self.key_group,
                    self.embedding_group,
                    self.root_device,
                    storage=self.table_storage,
                )
        super().setup(trainer)

    def _pipelined(self) -> bool:
        return isinstance(self.lightning_module, PipelinedLightningModule)

    def configure_ddp(self) -> None:
        if self._pipelined():
            # The engine all-reduces dense gradients itself (once per batch, after all micro-batches);
            # DDP's reducer would fire per backward. Start from rank 0's dense weights, as DDP does.
            _sync_module_states(self.model)
            return
        if self.pipeline_config.mode != "sync" and self.sharded_collections():
            raise ConfigError(
                f"strategy.pipeline={self.pipeline_config.mode} needs a model built on PipelinedLightningModule "
                f"(e.g. model=dlrm); {type(self.lightning_module).__name__} runs with strategy.pipeline=sync"
            )
        super().configure_ddp()

    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if not self._pipelined():  # pipelined modules update their tables inside the engine
            for collection in self.sharded_collections():
                collection.apply_sparse_updates()
        return output

    # -- checkpoints -------------------------------------------------------------------------------
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # Tables must be sharded for the current world before shards are read into them.
        return True

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        collections = self.sharded_collections()
        if not collections:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        if self._pipelined():
            self.lightning_module.flush_pipeline()  # pending write-backs land before shards are read
        if storage_options is not None:
            raise TypeError("NestPipeStrategy.save_checkpoint(storage_options=...) is not supported")
        path = Path(self.broadcast(str(filepath)))
        save_shards(
            path,
            checkpoint,
            collections,
            self.global_rank,
            self.world_size,
            lambda: self.barrier("nestpipe-checkpoint"),
        )

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(str(checkpoint_path)))
        collections = self.sharded_collections()
        if is_sharded_checkpoint(path):
            return load_shards(path, collections)
        if collections:
            raise ConfigError(
                f"{path} is not a NestPipe sharded checkpoint, but the model has sharded tables"
            )
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    # -- registry ----------------------------------------------------------------------------------
    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        """``nestpipe`` / ``nestpipe_spawn`` (synchronous) and one name per pipelined schedule:
        ``nestpipe_dbp``, ``nestpipe_fwp``, ``nestpipe_nested`` (``Trainer(strategy=...)``)."""
        names = [("nestpipe", "sync", "popen"), ("nestpipe_spawn", "sync", "spawn")]
        names += [(f"nestpipe_{mode}", mode, "popen") for mode in PIPELINE_MODES if mode != "sync"]
        for name, mode, start_method in names:
            if name not in strategy_registry:
                strategy_registry.register(
                    name,
                    cls,
                    description=f"NestPipe row-sharded embeddings, pipeline={mode} (start_method={start_method})",
                    pipeline=mode,
                    start_method=start_method,
                )


NestPipeStrategy.register_strategies(StrategyRegistry)
