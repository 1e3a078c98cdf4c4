"""``ShardedEmbeddingCollection``: row-sharded tables, looked up by All2All, trained synchronously.

Each rank owns a block of every table's rows (``RowWiseSharding``) in a host-memory
``ShardStore``. ``forward`` is the data plane (:mod:`nestrec.sharding.dataplane`) with nothing
overlapped, for all tables at once:

1. route the batch's ids to their owners (All2All of counts, then of keys);
2. each owner serves them from its shards: with the ``pooled`` exchange (every table pools) it
   sums its rows of every bag and sends partial sums back; with ``rows`` it sends each requester
   the unique rows it asked for, which ``embedding_bag`` pools on the requester;
3. what came back is an autograd leaf, so backward leaves its gradient in ``.grad``.

``apply_sparse_updates()`` (called once per batch by the strategy, after backward) sends those
gradients back to the owners along the reverse route, sums them per row across ranks, scales them
(by ``1 / world_size`` by default, so tables move by the gradient of the global mean loss, as DDP
does for dense parameters) and applies the row-wise optimizer once — or, for SGD, adds each
gradient straight in as it arrives (``fused_updates``). That makes the result identical to
synchronous training of a dense table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nestrec.devices import get_device_api
from nestrec.embedding.config import EmbeddingTableConfig
from nestrec.errors import ConfigError
from nestrec.sharding import comm, dataplane
from nestrec.sharding.optim import RowWiseOptimizer, RowWiseSGD
from nestrec.sharding.rule import RowWiseSharding
from nestrec.sharding.store import ShardStore
from nestrec.sparse.jagged import JaggedFeatures

__all__ = [
    "EXCHANGES",
    "INIT_CHUNK",
    "STORAGE_PLACES",
    "LookupPlan",
    "ShardedEmbeddingCollection",
    "initial_rows",
]

INIT_CHUNK = 65_536
STORAGE_PLACES = ("host", "device")
EXCHANGES = ("auto", "pooled", "rows")


def initial_rows(
    table: EmbeddingTableConfig,
    global_ids: torch.Tensor,
    seed: int = 0,
    init_std: float = 0.01,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Initial values of rows ``global_ids`` of ``table``, identical for every rank and world size.

    Rows are drawn in fixed chunks of ``INIT_CHUNK`` rows, each from its own seeded generator,
    so a rank only generates the chunks its rows fall in and never holds the whole table. A
    module function, so other systems (a TorchRec model in ``bench/vs_torchrec.py``) can start
    from the same rows without building a collection.
    """
    out = torch.empty(len(global_ids), table.dim, dtype=dtype)
    table_seed = sum(ord(c) * 31**i for i, c in enumerate(table.name)) % 2**31
    chunks = global_ids // INIT_CHUNK
    for chunk in torch.unique(chunks).tolist():
        start = chunk * INIT_CHUNK
        size = min(INIT_CHUNK, table.num_rows - start)
        generator = torch.Generator().manual_seed((seed * 1_000_003 + table_seed) * 65_537 + chunk)
        values = torch.randn(size, table.dim, generator=generator, dtype=dtype) * init_std
        mine = chunks == chunk
        out[mine] = values[global_ids[mine] - start]
    return out


@dataclass
class LookupPlan:
    """One training lookup, kept so its gradients can travel the reverse route at update time."""

    route: dataplane.BatchRoute
    buffer: dataplane.RowBuffer  # which rows the lookup served on this owner, and their gradients
    leaves: dict[str, torch.Tensor]  # the fetched unique rows; their .grad is the per-row gradient


class ShardedEmbeddingCollection(nn.Module):
    """Row-sharded embedding tables. Holds no ``nn.Parameter``: DDP never sees or averages them.

    Args:
        tables: the tables (see :class:`EmbeddingTableConfig`).
        optimizer: the row-wise optimizer applied to every table (``RowWiseSGD`` by default).
        sharding: ``range`` or ``cyclic`` (see :mod:`nestrec.sharding.rule`).
        dtype: table dtype (float32; the equivalence tests use float64).
        init_std: rows start as ``N(0, init_std²)`` drawn from a generator seeded by ``seed`` and
            the table name over the *whole* table, so every world size starts from the same values.
        grad_scale: ``"world"`` divides summed gradients by the world size (global-mean loss
            semantics, like TorchRec and DDP); a float multiplies by that.
        exchange: what the lookup's All2All carries back to the requester. ``rows``: the unique
            rows it asked for, pooled on the requester (any pooling; what the pipelines' row
            buffers were first built around). ``pooled``: each owner sums its rows of every bag and
            sends one partial sum per (feature, sample) — TorchRec's row-wise choice; fewer bytes
            and no requester-side dedup, for ``sum`` / ``mean`` tables only. ``auto`` (default):
            ``pooled`` when every table pools, else ``rows``. Both give the same parameters.
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingTableConfig],
        optimizer: RowWiseOptimizer | None = None,
        sharding: str = "range",
        dtype: torch.dtype = torch.float32,
        init_std: float = 0.01,
        seed: int = 0,
        grad_scale: str | float = "world",
        exchange: str = "auto",
    ):
        super().__init__()
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate table names in {names}")
        features = [f for t in tables for f in t.features]
        if len(set(features)) != len(features):
            raise ConfigError(f"a feature is assigned to more than one table: {features}")
        self.tables = list(tables)
        if exchange not in EXCHANGES:
            raise ConfigError(
                f"unknown embedding exchange {exchange!r}; expected one of {', '.join(EXCHANGES)}"
            )
        unpooled = [t.name for t in self.tables if t.pooling not in ("sum", "mean")]
        if exchange == "pooled" and unpooled:
            raise ConfigError(
                f"exchange='pooled' sums rows on their owner, but table(s) {', '.join(unpooled)} have "
                "pooling='none': use exchange='rows' or 'auto'"
            )
        self.exchange = exchange
        self.pooled_exchange = exchange == "pooled" or (exchange == "auto" and not unpooled)
        self.optimizer = optimizer or RowWiseSGD()
        self.sharding_mode = sharding
        self.dtype = dtype
        self.init_std = init_std
        self.seed = seed
        self.grad_scale = grad_scale
        self.feature_to_table = {f: t for t in self.tables for f in t.features}
        self.rank, self.world_size = 0, 1
        self.key_group = self.embedding_group = None
        self._rules: dict[str, RowWiseSharding] | None = None
        self._stores: dict[str, ShardStore] | None = None
        self._key_space: dataplane.KeySpace | None = None
        self._plans: list[LookupPlan] = []
        self._device = torch.device("cpu")
        self.storage = "host"
        self.store_device = self.key_device = self.comm_device = torch.device("cpu")
        self.device_api = get_device_api("cpu")

    # Shards are built on first use, not here: a table that only fits sharded must never be
    # materialised whole on every rank before the strategy calls ``shard(rank, world)``. A
    # collection used without a strategy becomes one unsharded shard (rank 0 of 1) then.
    @property
    def rules(self) -> dict[str, RowWiseSharding]:
        if self._rules is None:
            self.shard(self.rank, self.world_size)
        return self._rules

    @property
    def stores(self) -> dict[str, ShardStore]:
        if self._stores is None:
            self.shard(self.rank, self.world_size)
        return self._stores

    @property
    def key_space(self) -> dataplane.KeySpace:
        if self._key_space is None:
            self.shard(self.rank, self.world_size)
        return self._key_space

    # ---------------------------------------------------------------------------------------------
    # placement
    def shard(
        self,
        rank: int,
        world_size: int,
        key_group=None,
        embedding_group=None,
        device: torch.device | None = None,
        storage: str = "host",
    ) -> None:
        """(Re)build the local shards for ``rank`` of ``world_size`` (the strategy calls this).

        ``device`` is where the model computes: row buffers, their gradients and the row-wise
        optimizer step live there. ``storage`` is where the master shards live: ``host`` (the
        paper's hierarchical storage; pinned host memory on an accelerator, only the rows a batch
        touches travel) or ``device`` (the whole shard on the accelerator, when it fits). The
        collectives run where their process group's backend wants tensors (host for gloo).
        """
        if storage not in STORAGE_PLACES:
            raise ConfigError(
                f"unknown table storage {storage!r}; expected one of {', '.join(STORAGE_PLACES)}"
            )
        self.rank, self.world_size = rank, world_size
        self.key_group, self.embedding_group = key_group, embedding_group
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self.storage = storage
        self.store_device = self._device if storage == "device" else torch.device("cpu")
        self.key_device = comm.group_device(key_group, self._device)
        self.comm_device = comm.group_device(embedding_group, self._device)
        self.device_api = get_device_api(self._device.type)
        pin = self.store_device.type == "cpu" and self._device.type not in ("cpu", "meta")
        self._rules = {
            t.name: RowWiseSharding(t.num_rows, world_size, self.sharding_mode) for t in self.tables
        }
        self._stores = {}
        for table in self.tables:
            local = self.initial_rows(table, self._rules[table.name].global_ids(rank)).to(self.store_device)
            self._stores[table.name] = ShardStore(local, self.optimizer, pin_memory=pin)
        self._key_space = dataplane.KeySpace(self)
        self._plans.clear()

    @property
    def compute_device(self) -> torch.device:
        return self._device

    @property
    def direct_buffers(self) -> bool:
        """Whether the shard stores can serve as a batch's working rows (they sit on the compute
        device); otherwise every lookup copies its rows into a device buffer and writes them back."""
        return self.store_device == self._device

    def fused_updates(self, micro_batches: int) -> bool:
        """Whether a lookup of ``micro_batches`` micro-batches adds each gradient straight into the
        shard as it arrives (no per-row gradient sum, no dedup on the owner).

        Exact when the stores are the working rows (:attr:`direct_buffers`), the row-wise step is
        linear in the gradient (:meth:`RowWiseOptimizer.gradient_multiplier`, SGD) and no forward of
        the same batch reads the rows after the first gradient lands (one micro-batch: with more,
        the frozen window needs the update held back until every micro-batch has fetched).
        """
        linear = self.optimizer.gradient_multiplier() is not None
        return self.direct_buffers and micro_batches == 1 and linear

    def initial_rows(self, table: EmbeddingTableConfig, global_ids: torch.Tensor) -> torch.Tensor:
        """Initial values of the given rows (see :func:`initial_rows`)."""
        return initial_rows(table, global_ids, self.seed, self.init_std, self.dtype)

    def initial_table(self, table: EmbeddingTableConfig) -> torch.Tensor:
        """The whole table's initial values (for references in tests)."""
        return self.initial_rows(table, torch.arange(table.num_rows))

    # ---------------------------------------------------------------------------------------------
    # lookup
    def forward(self, features: JaggedFeatures) -> dict[str, torch.Tensor]:
        route = dataplane.route_keys(self, [features], self.key_group)
        training = torch.is_grad_enabled() and self.training
        buffer = dataplane.retrieve(self, route, direct=True)
        rows = dataplane.send_rows(self, buffer, route, 0, self.embedding_group)
        if training:
            rows = {name: r.requires_grad_(True) for name, r in rows.items()}
            self._plans.append(LookupPlan(route, buffer, rows))
        return dataplane.pool_rows(self, route, 0, rows)

    # ---------------------------------------------------------------------------------------------
    # update
    def apply_sparse_updates(self) -> None:
        """Send per-row gradients to their owners and apply the row-wise optimizer once per table.

        Call once per optimizer step on every rank, after backward. Lookups made since the last
        call (several with gradient accumulation or micro-batches) are all included, each row
        updated once with its summed gradient.
        """
        plans, self._plans = self._plans, []
        if not plans:
            return
        for plan in plans:  # same order on every rank
            grads = {
                name: leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
                for name, leaf in plan.leaves.items()
            }
            dataplane.return_grads(self, plan.buffer, plan.route, 0, grads, self.embedding_group)
        buffer = (
            plans[0].buffer if len(plans) == 1 else dataplane.merge_buffers(self, [p.buffer for p in plans])
        )
        dataplane.apply_update(self, buffer)
        dataplane.write_back(self, buffer)

    # ---------------------------------------------------------------------------------------------
    # inspection / checkpoint support
    def local_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """This rank's shard of every table: global row ids, weights, optimizer state, step."""
        out = {}
        for table in self.tables:
            store = self.stores[table.name]
            out[table.name] = {
                "global_ids": self.rules[table.name].global_ids(self.rank),
                "weight": store.weight.detach().cpu().clone(),
                "step": torch.tensor(store.step),
                **{f"state.{k}": v.detach().cpu().clone() for k, v in store.state.items()},
            }
        return out

    def gather_full(self, name: str, what: str = "weight") -> torch.Tensor:
        """The whole table (or a state tensor such as ``state.sum``) assembled on every rank.

        For tests and small-table export only: it materialises the table everywhere.
        """
        store = self.stores[name]
        local = store.weight if what == "weight" else store.state[what.removeprefix("state.")]
        rule = self.rules[name]
        full = torch.zeros(rule.num_rows, local.shape[1], dtype=local.dtype, device=self.comm_device)
        full[rule.global_ids(self.rank).to(self.comm_device)] = local.to(self.comm_device)
        if self.world_size > 1:
            dist.all_reduce(full, group=self.embedding_group)
        return full.cpu()

    def extra_repr(self) -> str:
        tables = ", ".join(f"{t.name}[{t.num_rows}x{t.dim},{t.pooling}]" for t in self.tables)
        return f"tables=({tables}), sharding={self.sharding_mode}, rank={self.rank}/{self.world_size}"
