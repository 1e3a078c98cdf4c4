"""The data movement of one batch, cut into the pieces the pipelines schedule separately.

``route_keys`` (stage 3)  every rank tells every owner which rows each of its micro-batches needs:
                           one All2All of counts and one of ids per table, on the key group.
``retrieve`` (stage 4)     each owner gathers the union of the requested rows — weights *and*
                           optimizer-state rows — from its host-memory shard into a ``RowBuffer``.
``reconcile``              the dual-buffer copy: rows of the next batch's buffer that the current
                           batch also touched are overwritten with their post-update values.
``send_rows`` /            per micro-batch (stage 5): owners serve rows from the *buffer* (never
``return_grads``           from DRAM) to the requesters; gradients travel back to the owners.
``apply_update``           one row-wise optimizer step on the buffer per batch.
``write_back``             the buffer's rows go back to the host shard.

Everything here is plain tensors and collectives; the engine decides which thread runs what.
Each function walks the tables in the collection's order, so collectives pair up across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nestrec.sharding.collection import ShardedEmbeddingCollection
from nestrec.sharding.comm import all_to_all_uneven, exchange_counts
from nestrec.sparse.jagged import JaggedFeatures

__all__ = [
    "MicroRoute",
    "RowBuffer",
    "TableRoute",
    "apply_update",
    "pool_micro_batch",
    "reconcile",
    "retrieve",
    "return_grads",
    "route_keys",
    "send_rows",
    "write_back",
]

Parts = list[tuple[str, torch.Tensor, torch.Tensor]]


@dataclass
class MicroRoute:
    """One micro-batch's route for one table, from both sides of the All2All."""

    parts: Parts  # requester: (feature, ids, lengths) of this table in the micro-batch
    inverse: torch.Tensor  # requester: each id -> its slot among the micro-batch's unique ids
    order: torch.Tensor  # requester: unique ids (sorted) -> owner-grouped order
    send_counts: list[int]  # requester: ids asked of each owner
    recv_counts: list[int]  # owner: ids each requester asked for
    served: torch.Tensor  # owner: buffer slot of every received id, in receive order


@dataclass
class TableRoute:
    keys: torch.Tensor  # owner: sorted local row indexes the whole batch touches on this shard
    micro: list[MicroRoute]


@dataclass
class RowBuffer:
    """Working copy of the rows one batch touches on this rank's shards (weights + optimizer state)."""

    keys: dict[str, torch.Tensor]
    rows: dict[str, torch.Tensor]
    state: dict[str, dict[str, torch.Tensor]]
    grads: dict[str, torch.Tensor] = field(default_factory=dict)


def route_keys(
    collection: ShardedEmbeddingCollection, micro_features: list[JaggedFeatures], group=None
) -> dict[str, TableRoute]:
    """Stage 3: route every micro-batch's unique ids to their owners (two collectives per table)."""
    world, num_micro = collection.world_size, len(micro_features)
    grouped = [collection.group_by_table(f) for f in micro_features]
    routes: dict[str, TableRoute] = {}
    for table in collection.tables:
        rule = collection.rules[table.name]
        counts = torch.zeros(world, num_micro, dtype=torch.long)
        requester: list[tuple[Parts, torch.Tensor, torch.Tensor]] = []
        by_owner: list[list[torch.Tensor]] = [[] for _ in range(world)]
        for i, by_table in enumerate(grouped):
            parts = by_table[table.name]
            ids = torch.cat([v for _, v, _ in parts]) if parts else torch.zeros(0, dtype=torch.long)
            unique, inverse = torch.unique(ids.cpu(), sorted=True, return_inverse=True)
            owners = rule.owner(unique)
            order = torch.argsort(owners, stable=True)
            counts[:, i] = torch.bincount(owners, minlength=world)
            for owner, chunk in enumerate(unique[order].split(counts[:, i].tolist())):
                by_owner[owner].append(chunk)
            requester.append((parts, inverse, order))
        # Payload layout: destination-major, micro-batch-minor, so one All2All carries all N.
        send = torch.cat([c for chunks in by_owner for c in chunks])
        recv = exchange_counts(counts.reshape(-1), group, channel="keys").view(world, num_micro)
        requested = all_to_all_uneven(send, counts.sum(1).tolist(), recv.sum(1).tolist(), group, "keys")
        local = rule.local_index(requested)
        chunks = local.split(recv.reshape(-1).tolist())  # source-major, micro-batch-minor
        keys = torch.unique(local, sorted=True)
        micro = []
        for i, (parts, inverse, order) in enumerate(requester):
            received = torch.cat([chunks[s * num_micro + i] for s in range(world)])
            micro.append(
                MicroRoute(
                    parts=parts,
                    inverse=inverse,
                    order=order,
                    send_counts=counts[:, i].tolist(),
                    recv_counts=recv[:, i].tolist(),
                    served=torch.searchsorted(keys, received),
                )
            )
        routes[table.name] = TableRoute(keys, micro)
    return routes


def retrieve(collection: ShardedEmbeddingCollection, routes: dict[str, TableRoute]) -> RowBuffer:
    """Stage 4: copy the batch's rows and their optimizer-state rows out of the host shards."""
    buffer = RowBuffer({}, {}, {})
    for table in collection.tables:
        keys = routes[table.name].keys
        store = collection.stores[table.name]
        buffer.keys[table.name] = keys
        buffer.rows[table.name] = store.gather(keys, torch.device("cpu"))
        buffer.state[table.name] = store.gather_state(keys, torch.device("cpu"))
        buffer.grads[table.name] = torch.zeros_like(buffer.rows[table.name])
    return buffer


def reconcile(active: RowBuffer, prefetch: RowBuffer) -> int:
    """The dual-buffer copy: ``prefetch`` rows also in ``active`` take ``active``'s (updated) values.

    Both key lists are sorted and unique, so the intersection is one ``isin`` and one
    ``searchsorted``. Optimizer-state rows are copied with the weights (they are parameters too).
    Returns the number of rows copied.
    """
    copied = 0
    for name, keys in prefetch.keys.items():
        shared = torch.isin(keys, active.keys[name])
        if not bool(shared.any()):
            continue
        source = torch.searchsorted(active.keys[name], keys[shared])
        prefetch.rows[name][shared] = active.rows[name][source]
        for state_name, values in prefetch.state[name].items():
            values[shared] = active.state[name][state_name][source]
        copied += int(shared.sum())
    return copied


def _fused_all_to_all(
    payloads: list[torch.Tensor],
    send_counts: list[list[int]],
    recv_counts: list[list[int]],
    group,
    channel: str,
) -> list[torch.Tensor]:
    """One All2All for several tables: per destination, every table's rows flattened back to back.

    ``payloads[t]`` holds table t's rows grouped by destination (``send_counts[t][r]`` rows for
    rank r); returns table t's received rows grouped by source (``recv_counts[t][s]`` from rank s).
    One collective per micro-batch instead of one per table, as TorchRec's grouped All2All: the
    per-call latency (2N·α per batch under FWP) is what bounds the useful micro-batch count.
    """
    world = len(send_counts[0])
    dims = [p.shape[1] if p.dim() > 1 else 1 for p in payloads]
    chunks = [p.split(counts) for p, counts in zip(payloads, send_counts)]
    send = torch.cat([chunks[t][r].reshape(-1) for r in range(world) for t in range(len(payloads))])
    send_splits = [sum(send_counts[t][r] * dims[t] for t in range(len(payloads))) for r in range(world)]
    recv_splits = [sum(recv_counts[t][s] * dims[t] for t in range(len(payloads))) for s in range(world)]
    received = all_to_all_uneven(send, send_splits, recv_splits, group, channel)
    pieces = received.split([recv_counts[t][s] * dims[t] for s in range(world) for t in range(len(payloads))])
    return [
        torch.cat([pieces[s * len(payloads) + t] for s in range(world)]).view(-1, *payloads[t].shape[1:])
        for t in range(len(payloads))
    ]


def send_rows(
    collection: ShardedEmbeddingCollection,
    buffer: RowBuffer,
    routes: dict[str, TableRoute],
    micro: int,
    group=None,
) -> dict[str, torch.Tensor]:
    """Stage 5 forward All2All: owners serve micro-batch ``micro``'s rows from the buffer.

    Returns, per table, the requester's unique rows in sorted-id order.
    """
    names = [t.name for t in collection.tables]
    micro_routes = [routes[n].micro[micro] for n in names]
    returned = _fused_all_to_all(
        [buffer.rows[n][r.served] for n, r in zip(names, micro_routes)],
        [r.recv_counts for r in micro_routes],
        [r.send_counts for r in micro_routes],
        group,
        "rows",
    )
    out = {}
    for name, route, rows_in_owner_order in zip(names, micro_routes, returned):
        rows = torch.empty_like(rows_in_owner_order)
        rows[route.order] = rows_in_owner_order
        out[name] = rows
    return out


def pool_micro_batch(
    collection: ShardedEmbeddingCollection,
    routes: dict[str, TableRoute],
    micro: int,
    unique_rows: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Expand unique rows to ids and pool per sample and feature, as ``collection.forward`` does."""
    pooled: dict[str, torch.Tensor] = {}
    for table in collection.tables:
        route = routes[table.name].micro[micro]
        pooled.update(collection.pool_table(table, route.parts, unique_rows[table.name][route.inverse]))
    return pooled


def return_grads(
    collection: ShardedEmbeddingCollection,
    buffer: RowBuffer,
    routes: dict[str, TableRoute],
    micro: int,
    grads: dict[str, torch.Tensor],
    group=None,
) -> None:
    """Stage 5 backward All2All: per-row gradients go to their owners and accumulate in the buffer."""
    names = [t.name for t in collection.tables]
    micro_routes = [routes[n].micro[micro] for n in names]
    received = _fused_all_to_all(
        [grads[n][r.order] for n, r in zip(names, micro_routes)],
        [r.send_counts for r in micro_routes],
        [r.recv_counts for r in micro_routes],
        group,
        "grads",
    )
    for name, route, back in zip(names, micro_routes, received):
        buffer.grads[name].index_add_(0, route.served, back.to(buffer.grads[name].dtype))


def apply_update(collection: ShardedEmbeddingCollection, buffer: RowBuffer) -> None:
    """One row-wise optimizer step per table on the buffer (rows and state), once per batch.

    Same scaling and step count as ``ShardedEmbeddingCollection.apply_sparse_updates``.
    """
    scale = 1.0 / collection.world_size if collection.grad_scale == "world" else float(collection.grad_scale)
    for table in collection.tables:
        store = collection.stores[table.name]
        store.step += 1
        grad = buffer.grads[table.name]
        if scale != 1.0:
            grad.mul_(scale)
        collection.optimizer.update(buffer.rows[table.name], buffer.state[table.name], grad, store.step)


def write_back(collection: ShardedEmbeddingCollection, buffer: RowBuffer) -> None:
    """Flush the buffer's rows and state rows into the host shards."""
    for table in collection.tables:
        collection.stores[table.name].write_back(
            buffer.keys[table.name], buffer.rows[table.name], buffer.state[table.name]
        )
