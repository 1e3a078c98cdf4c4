"""Worker side of the pipeline-equivalence tests (importable by spawned processes).

Each rank trains the same tiny model once per schedule on the same batch stream and rank 0 saves
every table row, every optimizer-state row and every dense parameter per schedule. The stream
is built to contain each hazard the brief lists (§3.3, §13):

* hot keys (Zipf) repeated within a batch, across micro-batches and in consecutive batches;
* hazard rows that appear only in even batches: in B(t-1) ∩ B(t+1) but not B(t) — the
  write-back-ordering hazard — one per table, the last row (uneven last shard);
* tables whose rows do not divide evenly over 2 or 4 ranks;
* a last batch smaller than the rest, and smaller than some micro-batch counts on every rank.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nestrec.pipeline.engine import NestPipeEngine, PipelineConfig
from nestrec.sharding import RowWiseAdagrad, RowWiseAdam, RowWiseSGD, ShardedEmbeddingCollection
from nestrec.sparse import JaggedFeatures
from sharded_reference import TABLES, Head

LOCAL_BATCH = 16
LAST_LOCAL_BATCH = 5
STEPS = 21  # 20 full batches + the short last one
HAZARD = {"user": 12, "item": 28}


def _ids(generator, count: int, rows: int, hazard: int, allow_hazard: bool) -> torch.Tensor:
    probs = 1.0 / torch.arange(1, rows, dtype=torch.float64) ** 1.1  # rows 0..rows-2 (no hazard row)
    ids = torch.multinomial(probs, count, replacement=True, generator=generator)
    if allow_hazard and count:
        ids[torch.randint(0, count, (max(1, count // 8),), generator=generator)] = hazard
    return ids


def make_stream(world_size: int, seed: int = 11) -> list[tuple[JaggedFeatures, torch.Tensor]]:
    """Global batches; rank r's samples are ``[r*b, (r+1)*b)``."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for step in range(STEPS):
        local = LAST_LOCAL_BATCH if step == STEPS - 1 else LOCAL_BATCH
        total = local * world_size
        hazard = step % 2 == 0
        users = _ids(g, total, 13, HAZARD["user"], hazard)
        items = _ids(g, total, 29, HAZARD["item"], hazard)
        hist_len = torch.randint(0, 6, (total,), generator=g)
        history = _ids(g, int(hist_len.sum()), 29, HAZARD["item"], hazard)
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


def local_batches(world_size: int, rank: int) -> list[tuple[JaggedFeatures, torch.Tensor]]:
    out = []
    for features, labels in make_stream(world_size):
        local = len(labels) // world_size
        index = torch.arange(rank * local, (rank + 1) * local)
        out.append((features.select_samples(index), labels[index]))
    return out


class TinyModel:
    """The :class:`PipelinedModel` contract for the test model."""

    def __init__(self, head: Head):
        self.head = head

    def sparse_features(self, batch):
        return batch[0]

    def select_samples(self, batch, index):
        return batch[0].select_samples(index), batch[1][index]

    def loss_sum(self, batch, pooled):
        return F.binary_cross_entropy_with_logits(self.head(pooled), batch[1], reduction="sum")


class CopyBufferCollection(ShardedEmbeddingCollection):
    """Tables whose every lookup copies its rows into a working buffer and writes them back: the
    path of host-resident shards on an accelerator (``storage=host``), run here on CPU."""

    @property
    def direct_buffers(self) -> bool:
        return False


def train(
    rank: int,
    world_size: int,
    config: PipelineConfig,
    sparse: str,
    groups,
    copy_buffers: bool = False,
    exchange: str = "auto",
) -> dict[str, torch.Tensor]:
    optimizer = {
        "adagrad": RowWiseAdagrad(lr=0.3),
        "adam": RowWiseAdam(lr=0.05),
        "sgd": RowWiseSGD(lr=0.3),  # linear: single-window lookups add gradients straight in
    }[sparse]
    kind = CopyBufferCollection if copy_buffers else ShardedEmbeddingCollection
    tables = kind(TABLES, optimizer=optimizer, dtype=torch.float64, exchange=exchange)
    tables.shard(rank, world_size, *groups)
    head = Head()
    dense_opt = torch.optim.Adam(head.parameters(), lr=0.01)
    engine = NestPipeEngine(TinyModel(head), tables, list(head.parameters()), dense_opt.step, config)
    iterator = iter(local_batches(world_size, rank))
    steps = 0
    while results := engine.step(iterator):
        steps += len(results)
    engine.close()
    assert steps == STEPS, f"{config.mode}: trained {steps} batches, expected {STEPS}"
    out = {f"dense.{k}": v.detach().clone() for k, v in head.state_dict().items()}
    for t in TABLES:
        out[f"{t.name}.weight"] = tables.gather_full(t.name)
        for name in tables.stores[t.name].state:
            out[f"{t.name}.state.{name}"] = tables.gather_full(t.name, f"state.{name}")
    return out


def worker(rank: int, world_size: int, runs: list[tuple], init_file: str, out_file: str):
    """Train every ``(label, PipelineConfig kwargs, sparse optimizer[, "copy"][, "rows"])`` in
    ``runs`` (``"copy"``: a :class:`CopyBufferCollection`; ``"rows"``: the rows exchange instead of
    the default pooled one); rank 0 saves."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        groups = (dist.new_group(backend="gloo"), dist.new_group(backend="gloo"))
        results = {
            label: train(
                rank,
                world_size,
                PipelineConfig(**kw),
                sparse,
                groups,
                "copy" in extra,
                "rows" if "rows" in extra else "auto",
            )
            for label, kw, sparse, *extra in runs
        }
        if rank == 0:
            torch.save(results, Path(out_file))
    finally:
        dist.destroy_process_group()
