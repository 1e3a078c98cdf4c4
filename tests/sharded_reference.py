"""Shared pieces of the sharded-embedding equivalence tests (importable by spawned workers).

A tiny CTR-like model — three features over two tables, an MLP on the pooled vectors — trained
two ways on the same global batches: sharded over W gloo processes, and in one process with
plain ``nn.Embedding`` tables and stock torch optimizers. The batch stream is built to hit the
hazards that break sharded or pipelined training: Zipf-skewed duplicate ids within a batch, ids
shared by consecutive batches, ids in batches t-1 and t+1 but not t, the first and last row of
every table, and tables whose rows do not divide evenly over the ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from nestrec.embedding import EmbeddingCollection, EmbeddingTableConfig
from nestrec.sharding import RowWiseAdagrad, RowWiseAdam, RowWiseSGD, ShardedEmbeddingCollection
from nestrec.sparse import JaggedFeatures

TABLES = [
    EmbeddingTableConfig("user", num_rows=13, dim=4, features=("user",), pooling="sum"),
    EmbeddingTableConfig("item", num_rows=29, dim=4, features=("item", "history"), pooling="mean"),
]
LOCAL_BATCH = 6
SPARSE_LR = {"sgd": 0.5, "adagrad": 0.3, "adam": 0.05}


def make_batches(steps: int, world_size: int, seed: int = 7) -> list[tuple[JaggedFeatures, torch.Tensor]]:
    """Global batches of ``world_size * LOCAL_BATCH`` samples, samples of rank r at rows r*b:(r+1)*b."""
    g = torch.Generator().manual_seed(seed)
    total = world_size * LOCAL_BATCH
    batches = []
    for step in range(steps):
        zipf = torch.distributions.Categorical(probs=1.0 / torch.arange(1, 30, dtype=torch.float64) ** 1.2)
        items = zipf.sample((total,)).long() if step % 3 else torch.randint(0, 29, (total,), generator=g)
        if step % 2 == 0:
            items[0] = 28  # last row, in batches t-1 and t+1 but not t
        users = torch.randint(0, 13, (total,), generator=g)
        users[-1] = 12 if step % 4 == 0 else 0
        hist_len = torch.randint(0, 5, (total,), generator=g)
        history = torch.randint(0, 29, (int(hist_len.sum()),), generator=g)
        labels = torch.randint(0, 2, (total,), generator=g).double()
        features = JaggedFeatures.from_dict(
            {
                "user": (users, torch.ones(total, dtype=torch.long)),
                "item": (items, torch.ones(total, dtype=torch.long)),
                "history": (history, hist_len),
            }
        )
        batches.append((features, labels))
    return batches


def local_part(
    features: JaggedFeatures, labels: torch.Tensor, rank: int
) -> tuple[JaggedFeatures, torch.Tensor]:
    index = torch.arange(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    return features.select_samples(index), labels[index]


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.mlp = nn.Sequential(
            nn.Linear(12, 8, dtype=torch.float64), nn.Tanh(), nn.Linear(8, 1, dtype=torch.float64)
        )

    def forward(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.mlp(torch.cat([pooled["user"], pooled["item"], pooled["history"]], dim=1)).squeeze(1)


def row_optimizer(name: str):
    lr = SPARSE_LR[name]
    return {"sgd": RowWiseSGD(lr=lr), "adagrad": RowWiseAdagrad(lr=lr), "adam": RowWiseAdam(lr=lr)}[name]


def train_reference(optimizer: str, steps: int, world_size: int) -> dict[str, torch.Tensor]:
    """One process, dense ``nn.Embedding`` tables and torch's own optimizers on the global batch."""
    template = ShardedEmbeddingCollection(TABLES, dtype=torch.float64)
    tables = EmbeddingCollection(TABLES, dtype=torch.float64, sparse_grad=optimizer == "adam")
    with torch.no_grad():
        for t in TABLES:
            tables.embeddings[t.name].weight.copy_(template.initial_table(t))
    head = Head()
    params = [tables.embeddings[t.name].weight for t in TABLES]
    lr = SPARSE_LR[optimizer]
    sparse_opt = {
        "sgd": lambda: torch.optim.SGD(params, lr=lr),
        "adagrad": lambda: torch.optim.Adagrad(params, lr=lr),
        "adam": lambda: torch.optim.SparseAdam(params, lr=lr),
    }[optimizer]()
    dense_opt = torch.optim.Adam(head.parameters(), lr=0.01)
    for features, labels in make_batches(steps, world_size):
        loss = nn.functional.binary_cross_entropy_with_logits(head(tables(features)), labels)
        sparse_opt.zero_grad()
        dense_opt.zero_grad()
        loss.backward()
        sparse_opt.step()
        dense_opt.step()
    out = {f"dense.{k}": v.detach().clone() for k, v in head.state_dict().items()}
    for t, p in zip(TABLES, params):
        out[f"{t.name}.weight"] = p.detach().clone()
        state = sparse_opt.state.get(p, {})
        for key, name in (
            ("sum", "state.sum"),
            ("exp_avg", "state.exp_avg"),
            ("exp_avg_sq", "state.exp_avg_sq"),
        ):
            if key in state:
                out[f"{t.name}.{name}"] = state[key].to_dense().clone()
    return out


def train_sharded_worker(
    rank: int,
    world_size: int,
    optimizer: str,
    steps: int,
    sharding: str,
    init_file: str,
    out_file: str,
    grad_scale="world",
    exchange: str = "auto",
):
    """One rank of the sharded run; rank 0 saves every table row, state row and dense parameter."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        key_group, emb_group = dist.new_group(backend="gloo"), dist.new_group(backend="gloo")
        tables = ShardedEmbeddingCollection(
            TABLES,
            optimizer=row_optimizer(optimizer),
            sharding=sharding,
            dtype=torch.float64,
            grad_scale=grad_scale,
            exchange=exchange,
        )
        tables.shard(rank, world_size, key_group, emb_group)
        head = Head()
        dense_opt = torch.optim.Adam(head.parameters(), lr=0.01)
        for features, labels in make_batches(steps, world_size):
            local_features, local_labels = local_part(features, labels, rank)
            loss = nn.functional.binary_cross_entropy_with_logits(head(tables(local_features)), local_labels)
            dense_opt.zero_grad()
            loss.backward()
            for p in head.parameters():  # what DDP does: average dense gradients over ranks
                dist.all_reduce(p.grad)
                p.grad.div_(world_size)
            dense_opt.step()
            tables.apply_sparse_updates()
        out = {f"dense.{k}": v.detach().clone() for k, v in head.state_dict().items()}
        for t in TABLES:
            out[f"{t.name}.weight"] = tables.gather_full(t.name)
            for name in tables.stores[t.name].state:
                out[f"{t.name}.state.{name}"] = tables.gather_full(t.name, f"state.{name}")
        if rank == 0:
            torch.save(out, out_file)
    finally:
        dist.destroy_process_group()


def checkpoint_worker(
    rank: int, world_size: int, sharding: str, init_file: str, ckpt_dir: str, mode: str, steps: int = 5
):
    """``mode='save'``: train a few steps then save shards (and the full tables, for comparison).
    ``mode='load'``: load the shards into this world size / rule and save what every rank sees."""
    from pathlib import Path

    from nestrec.checkpoint import load_shards, save_shards

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        tables = ShardedEmbeddingCollection(
            TABLES, optimizer=row_optimizer("adam"), sharding=sharding, dtype=torch.float64
        )
        tables.shard(rank, world_size, None, None)
        names = [
            f"{t.name}.{what}" for t in TABLES for what in ("weight", "state.exp_avg", "state.exp_avg_sq")
        ]
        if mode == "save":
            head = Head()
            for features, labels in make_batches(steps, world_size):
                local_features, local_labels = local_part(features, labels, rank)
                nn.functional.binary_cross_entropy_with_logits(
                    head(tables(local_features)), local_labels
                ).backward()
                tables.apply_sparse_updates()
            save_shards(Path(ckpt_dir), {"note": "meta"}, [tables], rank, world_size, dist.barrier)
            suffix = "saved"
        else:
            meta = load_shards(Path(ckpt_dir), [tables])
            assert meta == {"note": "meta"}
            suffix = f"loaded-{world_size}-{sharding}"
        full = {}
        for name in names:
            table, what = name.split(".", 1)
            full[name] = tables.gather_full(table, what)
        full["steps"] = torch.tensor([tables.stores[t.name].step for t in TABLES])
        if rank == 0:
            torch.save(full, Path(ckpt_dir).with_name(f"full-{suffix}.pt"))
    finally:
        dist.destroy_process_group()
