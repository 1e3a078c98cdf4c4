"""``ShardedEmbeddingCollection``: row-sharded tables, looked up by All2All, trained synchronously.

Each rank owns a block of every table's rows (``RowWiseSharding``) in a host-memory
``ShardStore``. A lookup, per table and in the same order on every rank:

1. dedup the batch's ids (``torch.unique``) and bucket them by owner;
2. key routing: All2All of the counts, then of the ids (``key_group``);
3. each owner dedups the keys it received from all ranks and gathers those rows from its shard;
4. All2All of the rows back to the requesters (``embedding_group``);
5. rows are expanded to the original ids and pooled per feature.

The fetched unique rows are a leaf tensor, so autograd leaves the per-row gradient, already
summed over duplicate ids, in its ``.grad``. ``apply_sparse_updates()`` (called once per batch by
the strategy, after backward) sends those gradients back to the owners along the reverse route,
sums them per row across ranks, scales them (by ``1 / world_size`` by default, so tables move by
the gradient of the global mean loss, as DDP does for dense parameters) and applies the row-wise
optimizer once. That makes the result identical to synchronous training of a dense table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nestrec.embedding.collection import check_ids, pool
from nestrec.embedding.config import EmbeddingTableConfig
from nestrec.errors import ConfigError
from nestrec.sharding.comm import all_to_all_uneven, exchange_counts
from nestrec.sharding.optim import RowWiseOptimizer, RowWiseSGD
from nestrec.sharding.rule import RowWiseSharding
from nestrec.sharding.store import ShardStore
from nestrec.sparse.jagged import JaggedFeatures

__all__ = ["ShardedEmbeddingCollection", "LookupPlan"]


@dataclass
class LookupPlan:
    """How one table's lookup was routed, kept so gradients can travel the reverse route."""

    table: str
    order: torch.Tensor  # permutation of the unique ids into owner order
    send_counts: list[int]  # ids this rank sent to each owner
    recv_counts: list[int]  # ids each peer asked this rank for
    served_local: torch.Tensor  # local slots this rank served, in receive order
    rows: torch.Tensor  # the fetched unique rows (leaf; its .grad is the per-row gradient)


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
    ):
        super().__init__()
        names = [t.name for t in tables]
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate table names in {names}")
        features = [f for t in tables for f in t.features]
        if len(set(features)) != len(features):
            raise ConfigError(f"a feature is assigned to more than one table: {features}")
        self.tables = list(tables)
        self.optimizer = optimizer or RowWiseSGD()
        self.sharding_mode = sharding
        self.dtype = dtype
        self.init_std = init_std
        self.seed = seed
        self.grad_scale = grad_scale
        self.feature_to_table = {f: t for t in self.tables for f in t.features}
        self.rank, self.world_size = 0, 1
        self.key_group = self.embedding_group = None
        self.rules: dict[str, RowWiseSharding] = {}
        self.stores: dict[str, ShardStore] = {}
        self._plans: list[LookupPlan] = []
        self._device = torch.device("cpu")
        self.shard(0, 1)

    # ---------------------------------------------------------------------------------------------
    # placement
    def shard(
        self,
        rank: int,
        world_size: int,
        key_group=None,
        embedding_group=None,
        device: torch.device | None = None,
    ) -> None:
        """(Re)build the local shards for ``rank`` of ``world_size`` (the strategy calls this)."""
        self.rank, self.world_size = rank, world_size
        self.key_group, self.embedding_group = key_group, embedding_group
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        pin = self._device.type not in ("cpu", "meta")
        self.rules = {
            t.name: RowWiseSharding(t.num_rows, world_size, self.sharding_mode) for t in self.tables
        }
        self.stores = {}
        for table in self.tables:
            local = self.initial_rows(table, self.rules[table.name].global_ids(rank))
            self.stores[table.name] = ShardStore(local, self.optimizer, pin_memory=pin)
        self._plans.clear()

    INIT_CHUNK = 65_536

    def initial_rows(self, table: EmbeddingTableConfig, global_ids: torch.Tensor) -> torch.Tensor:
        """Initial values of the given rows, identical for every rank and world size.

        Rows are drawn in fixed chunks of ``INIT_CHUNK`` rows, each from its own seeded generator,
        so a rank only generates the chunks its rows fall in and never holds the whole table.
        """
        out = torch.empty(len(global_ids), table.dim, dtype=self.dtype)
        table_seed = sum(ord(c) * 31**i for i, c in enumerate(table.name)) % 2**31
        chunks = global_ids // self.INIT_CHUNK
        for chunk in torch.unique(chunks).tolist():
            start = chunk * self.INIT_CHUNK
            size = min(self.INIT_CHUNK, table.num_rows - start)
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + table_seed) * 65_537 + chunk)
            values = torch.randn(size, table.dim, generator=generator, dtype=self.dtype) * self.init_std
            mine = chunks == chunk
            out[mine] = values[global_ids[mine] - start]
        return out

    def initial_table(self, table: EmbeddingTableConfig) -> torch.Tensor:
        """The whole table's initial values (for references in tests)."""
        return self.initial_rows(table, torch.arange(table.num_rows))

    # ---------------------------------------------------------------------------------------------
    # lookup
    def forward(self, features: JaggedFeatures) -> dict[str, torch.Tensor]:
        if (
            self.world_size == 1
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            # Under plain DDP every rank would train its own full copy and the copies would drift.
            raise ConfigError(
                f"ShardedEmbeddingCollection is not sharded over the {dist.get_world_size()} processes: use strategy=nestpipe"
            )
        by_table = self.group_by_table(features)
        out: dict[str, torch.Tensor] = {}
        # Every rank walks the tables in the same order, so the collectives pair up.
        for table in self.tables:
            parts = by_table[table.name]
            device = parts[0][1].device if parts else self._device
            ids = (
                torch.cat([v for _, v, _ in parts])
                if parts
                else torch.zeros(0, dtype=torch.long, device=device)
            )
            unique_rows, inverse = self._lookup_unique(table, ids)
            out.update(self.pool_table(table, parts, unique_rows[inverse]))
        return out

    def group_by_table(
        self, features: JaggedFeatures
    ) -> dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]]:
        """``{table: [(feature, ids, lengths), ...]}`` with every id checked against its table."""
        by_table: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {t.name: [] for t in self.tables}
        for feature, (values, lengths) in features.split().items():
            if feature not in self.feature_to_table:
                raise ConfigError(
                    f"feature {feature!r} has no embedding table (known: {', '.join(self.feature_to_table)})"
                )
            table = self.feature_to_table[feature]
            check_ids(values, table, feature)
            by_table[table.name].append((feature, values, lengths))
        return by_table

    @staticmethod
    def pool_table(
        table: EmbeddingTableConfig,
        parts: list[tuple[str, torch.Tensor, torch.Tensor]],
        per_id: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Pool one table's per-id rows (ids in ``parts`` order) into one vector per sample per feature."""
        out, offset = {}, 0
        for feature, values, lengths in parts:
            out[feature] = pool(per_id[offset : offset + len(values)], lengths, table.pooling)
            offset += len(values)
        return out

    def _lookup_unique(
        self, table: EmbeddingTableConfig, ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rule = self.rules[table.name]
        unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        owners = rule.owner(unique)
        order = torch.argsort(owners, stable=True)
        send_ids = unique[order]
        send_counts_t = torch.bincount(owners, minlength=self.world_size)
        recv_counts_t = exchange_counts(send_counts_t.cpu(), self.key_group, channel="keys")
        send_counts, recv_counts = send_counts_t.tolist(), recv_counts_t.tolist()
        requested = all_to_all_uneven(
            send_ids.cpu(), send_counts, recv_counts, self.key_group, channel="keys"
        )
        served_local = rule.local_index(requested)
        # The owner dedups again: several ranks often ask for the same hot rows.
        wanted, expand = torch.unique(served_local, sorted=True, return_inverse=True)
        served_rows = self.stores[table.name].gather(wanted, torch.device("cpu"))[expand]
        returned = all_to_all_uneven(
            served_rows, recv_counts, send_counts, self.embedding_group, channel="rows"
        )
        rows = torch.empty_like(returned)
        rows[order.cpu()] = returned
        rows = rows.to(ids.device)
        if torch.is_grad_enabled() and self.training:
            rows.requires_grad_(True)
            self._plans.append(LookupPlan(table.name, order, send_counts, recv_counts, served_local, rows))
        return rows, inverse

    # ---------------------------------------------------------------------------------------------
    # update
    def apply_sparse_updates(self) -> None:
        """Send per-row gradients to their owners and apply the row-wise optimizer once per table.

        Call once per optimizer step on every rank, after backward. Lookups made since the last
        call (several with gradient accumulation or micro-batches) are all included.
        """
        plans, self._plans = self._plans, []
        received: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {t.name: [] for t in self.tables}
        for plan in plans:  # same order on every rank
            grad = plan.rows.grad if plan.rows.grad is not None else torch.zeros_like(plan.rows)
            send = grad.detach()[plan.order].cpu()
            back = all_to_all_uneven(
                send, plan.send_counts, plan.recv_counts, self.embedding_group, channel="grads"
            )
            received[plan.table].append((plan.served_local, back))
        scale = 1.0 / self.world_size if self.grad_scale == "world" else float(self.grad_scale)
        for table in self.tables:
            if not received[table.name]:
                continue
            local = torch.cat([idx for idx, _ in received[table.name]])
            grads = torch.cat([g for _, g in received[table.name]])
            touched, position = torch.unique(local, sorted=True, return_inverse=True)
            summed = torch.zeros(len(touched), grads.shape[1], dtype=grads.dtype).index_add_(
                0, position, grads
            )
            if scale != 1.0:
                summed.mul_(scale)
            self.stores[table.name].apply_update(touched, summed, self.optimizer, torch.device("cpu"))

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
        full = torch.zeros(rule.num_rows, local.shape[1], dtype=local.dtype)
        full[rule.global_ids(self.rank)] = local.cpu()
        if self.world_size > 1:
            dist.all_reduce(full, group=self.embedding_group)
        return full

    def extra_repr(self) -> str:
        tables = ", ".join(f"{t.name}[{t.num_rows}x{t.dim},{t.pooling}]" for t in self.tables)
        return f"tables=({tables}), sharding={self.sharding_mode}, rank={self.rank}/{self.world_size}"
