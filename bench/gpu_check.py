"""The device data plane on a real accelerator, in one short run: exactness, host syncs, memory, speed.

Written to run once, unattended, when a GPU is lent (``bench/gpu_check.sh``), and rehearsed on
CPU first (``--dry-run``: same code, tiny sizes, CPU + gloo), so it is known to work before the
GPU minutes start. Every check prints one line as it finishes and everything lands in ``--out``.

1. **exact** — a float64 model with Zipf-hot ids trained 12 steps under every schedule
   (``sync``, ``dbp``, ``fwp``, ``nested``) and both table placements (``storage=host``: pinned
   host shards, rows copied per batch; ``storage=device``), on one device process with the
   accelerator's collective backend, every micro-batch loop under ``check_host_sync`` (a host
   synchronisation raises). Compared with the same training on the CPU: max |Δ| of every row and
   dense weight.
2. **exact-2rank** — the same on 2 processes sharing the device, collectives on gloo (one GPU
   cannot host two NCCL ranks): the cross-rank data plane with device buffers.
3. **memory** — one table far larger than a batch touches, kept on the host: the device memory a
   step allocates (peak above the model's) against the batch's working rows and the table size.
4. **speed** — the ``bench/vs_torchrec.py`` workload shape (4 tables × 100,000 × 64, bags of 1–39
   Zipf ids, MLP 272-512-256-1) on one device, every schedule × placement, interleaved chunks;
   median ms/step and the min–max spread over chunks.

    bash bench/gpu_check.sh --dry-run     # CPU rehearsal, < 1 min
    bash bench/gpu_check.sh               # on a CUDA machine, ~3-5 min
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from nestrec.embedding import EmbeddingTableConfig
from nestrec.pipeline.engine import NestPipeEngine, PipelineConfig
from nestrec.sharding import RowWiseAdagrad, RowWiseSGD, ShardedEmbeddingCollection
from nestrec.sparse import JaggedFeatures

SCHEDULES = {
    "sync": {"mode": "sync"},
    "dbp": {"mode": "dbp"},
    "fwp": {"mode": "fwp", "micro_batches": 4},
    "nested": {"mode": "nested", "micro_batches": 4},
}
PLACEMENTS = ("host", "device")


def log(message: str) -> None:
    print(message, flush=True)


# -- workload -------------------------------------------------------------------------------------
def make_batches(tables, steps: int, batch: int, max_bag: int, seed: int) -> list[tuple]:
    """Zipf(1.05) ids in bags of 1..max_bag per table, relabelled so hot ids spread over shards."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        feats = {}
        for t in tables:
            lengths = torch.randint(1, max_bag + 1, (batch,), generator=g)
            probs = 1.0 / torch.arange(1, t.num_rows + 1, dtype=torch.float64) ** 1.05
            ranks = torch.multinomial(probs, int(lengths.sum()), replacement=True, generator=g)
            feats[t.features[0]] = ((ranks * 7919) % t.num_rows, lengths)
        dense = torch.randn(batch, 16, generator=g)
        labels = torch.randint(0, 2, (batch,), generator=g).float()
        out.append((JaggedFeatures.from_dict(feats), dense, labels))
    return out


class Model(nn.Module):
    """Pooled tables + dense features -> MLP -> logit; the PipelinedModel contract."""

    def __init__(self, tables, hidden: list[int], dtype: torch.dtype):
        super().__init__()
        torch.manual_seed(0)
        width, layers = sum(t.dim for t in tables) + 16, []
        for h in hidden:
            layers += [nn.Linear(width, h, dtype=dtype), nn.ReLU()]
            width = h
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1, dtype=dtype))
        self.names = [t.features[0] for t in tables]

    def sparse_features(self, batch):
        return batch[0]

    def select_samples(self, batch, index):
        return batch[0].select_samples(index), batch[1][index], batch[2][index]

    def loss_sum(self, batch, pooled):
        w = self.mlp[0].weight
        x = torch.cat([pooled[n].to(w.dtype) for n in self.names] + [batch[1].to(w.device, w.dtype)], 1)
        target = batch[2].to(w.device, w.dtype)
        return F.binary_cross_entropy_with_logits(self.mlp(x).squeeze(1), target, reduction="sum")


class Runner:
    """One schedule × placement: tables, model, optimizer, engine."""

    def __init__(self, tables, schedule, storage, device, rank, world, groups, dtype, hidden, sparse):
        self.model = Model(tables, hidden, dtype).to(device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05)
        self.tables = ShardedEmbeddingCollection(tables, optimizer=sparse(), dtype=dtype, init_std=0.05)
        self.tables.shard(rank, world, *groups, device=device, storage=storage)
        config = PipelineConfig(**SCHEDULES[schedule], check_host_sync=True)
        self.engine = NestPipeEngine(
            self.model, self.tables, list(self.model.parameters()), self.step_dense, config
        )
        self.chunk_ms: list[float] = []

    def step_dense(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run(self, iterator, count: int | None, sync) -> None:
        start, done = time.perf_counter(), 0
        while count is None or done < count:
            results = self.engine.step(iterator)
            if not results:
                break
            done += 1
        sync()
        if done:
            self.chunk_ms.append((time.perf_counter() - start) * 1e3 / done)

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"dense.{k}": v.detach().cpu() for k, v in self.model.state_dict().items()}
        for t in self.tables.tables:
            out[t.name] = self.tables.gather_full(t.name)
        return out

    def close(self) -> None:
        self.engine.close()


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


# -- the checks -------------------------------------------------------------------------------------
def exact_tables() -> list[EmbeddingTableConfig]:
    return [
        EmbeddingTableConfig("a", num_rows=97, dim=8, features=("fa",)),
        EmbeddingTableConfig("b", num_rows=1001, dim=4, features=("fb",), pooling="mean"),
    ]


def exactness(device, rank: int, world: int, groups_for, steps: int = 12) -> dict[str, float]:
    """Every schedule × placement on ``device`` against sync on the CPU (float64, same batches)."""
    tables = exact_tables()
    batches = make_batches(tables, steps, 16, 6, seed=100 + rank)
    kwargs = dict(
        rank=rank, world=world, dtype=torch.float64, hidden=[16], sparse=lambda: RowWiseAdagrad(lr=0.2)
    )
    cpu_groups = groups_for(torch.device("cpu"))
    reference = Runner(tables, "sync", "host", torch.device("cpu"), groups=cpu_groups, **kwargs)
    reference.run(iter(batches), None, lambda: None)
    expected = reference.state()
    reference.close()
    diffs = {}
    for schedule in SCHEDULES:
        for storage in PLACEMENTS:
            runner = Runner(tables, schedule, storage, device, groups=groups_for(device), **kwargs)
            runner.run(iter(batches), None, lambda: None)
            diffs[f"{schedule}/{storage}"] = max_diff(runner.state(), expected)
            runner.close()
    return diffs


def memory(device, args) -> dict[str, float]:
    """Device bytes a step allocates with a table much larger than the batch's rows (host storage)."""
    rows = args.memory_rows
    tables = [EmbeddingTableConfig("big", num_rows=rows, dim=64, features=("f",))]
    batches = make_batches(tables, 4, args.batch, 39, seed=7)
    runner = Runner(
        tables,
        "nested",
        "host",
        device,
        0,
        1,
        (None, None),
        torch.float32,
        [512, 256],
        lambda: RowWiseSGD(0.05),
    )
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    runner.run(iter(batches), None, torch.cuda.synchronize if cuda else lambda: None)
    peak = (torch.cuda.max_memory_allocated() - base) if cuda else float("nan")
    touched = max(len(torch.unique(b[0].values)) for b in batches)
    runner.close()
    return {
        "table_bytes": rows * 64 * 4,
        "working_row_bytes": touched * 64 * 4,
        "step_peak_device_bytes": peak,
    }


def speed(device, args) -> dict[str, dict]:
    tables = [
        EmbeddingTableConfig(f"t{i}", num_rows=args.rows, dim=64, features=(f"f{i}",)) for i in range(4)
    ]
    batches = make_batches(tables, args.steps, args.batch, 39, seed=3)
    runners = {
        f"{s}/{p}": Runner(
            tables, s, p, device, 0, 1, (None, None), torch.float32, [512, 256], lambda: RowWiseSGD(0.05)
        )
        for s in SCHEDULES
        for p in PLACEMENTS
    }
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    iterators = {name: iter(batches) for name in runners}
    for name, runner in runners.items():  # warm-up: allocator, kernels, lanes
        runner.run(iterators[name], 2, sync)
        runner.chunk_ms.clear()
    rounds = (args.steps - 2) // args.chunk
    for _ in range(rounds):
        for name, runner in runners.items():  # interleaved
            runner.run(iterators[name], args.chunk, sync)
    out = {}
    for name, runner in runners.items():
        ms = runner.chunk_ms
        out[name] = {
            "median_ms": statistics.median(ms),
            "min_ms": min(ms),
            "max_ms": max(ms),
            "chunks": len(ms),
        }
        runner.close()
    return out


# -- processes --------------------------------------------------------------------------------------
def _init(rank: int, world: int, backend: str, init_file: str) -> None:
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)


def two_groups(backend: str) -> tuple:
    """A key group and an embedding group: the router and comm lanes must never share one."""
    return dist.new_group(backend=backend), dist.new_group(backend=backend)


def single_worker(rank: int, args, init_file: str, out_file: str) -> None:
    """One process on the device: exactness on the accelerator's backend, memory, speed."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    _init(0, 1, backend, init_file)
    try:
        result = {}
        start = time.perf_counter()
        result["exact"] = exactness(
            device, 0, 1, lambda d: two_groups("gloo" if d.type == "cpu" else backend), args.exact_steps
        )
        worst = max(result["exact"].values())
        log(
            f"exact (1 process, {backend}): max |Δ| vs CPU sync {worst:.2e} over {len(result['exact'])} runs "
            f"({time.perf_counter() - start:.0f} s)"
        )
        start = time.perf_counter()
        result["memory"] = memory(device, args)
        m = result["memory"]
        log(
            f"memory: table {m['table_bytes'] / 2**20:.0f} MiB on the host, working rows "
            f"{m['working_row_bytes'] / 2**20:.1f} MiB, step peak on device {m['step_peak_device_bytes'] / 2**20:.1f} MiB "
            f"({time.perf_counter() - start:.0f} s)"
        )
        start = time.perf_counter()
        result["speed"] = speed(device, args)
        for name, s in result["speed"].items():
            log(f"speed {name:>12}: {s['median_ms']:7.2f} ms/step ({s['min_ms']:.2f}-{s['max_ms']:.2f})")
        log(f"speed: {time.perf_counter() - start:.0f} s")
        torch.save(result, out_file)
    finally:
        dist.destroy_process_group()


def pair_worker(rank: int, args, init_file: str, out_file: str) -> None:
    """Two processes sharing the device, every group on gloo: the cross-rank data plane."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    _init(rank, 2, "gloo", init_file)
    try:
        diffs = exactness(device, rank, 2, lambda d: two_groups("gloo"), args.exact_steps)
        if rank == 0:
            torch.save(diffs, out_file)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="CPU rehearsal at tiny sizes")
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--memory-rows", type=int, default=20_000_000, help="rows of the memory check's table")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--chunk", type=int, default=5)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--tolerance", type=float, default=1e-10)
    p.add_argument("--exact-steps", type=int, default=12, help="steps of each float64 exactness run")
    p.add_argument("--out", default="bench/results/gpu_check.json")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device, args.rows, args.memory_rows, args.batch, args.steps, args.threads, args.exact_steps = (
            "cpu", 5_000, 50_000, 64, 8, 1, 5,
        )  # fmt: skip
    elif not torch.cuda.is_available():
        log("no CUDA device here: run with --dry-run for the CPU rehearsal")
        return 2
    log(
        f"gpu_check: torch {torch.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
        + (" — DRY RUN (CPU, tiny sizes)" if args.dry_run else "")
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(single_worker, args=(args, f"{tmp}/pg1", f"{tmp}/one.pt"), nprocs=1, join=True)
        result = torch.load(f"{tmp}/one.pt")
        start = time.perf_counter()
        mp.spawn(pair_worker, args=(args, f"{tmp}/pg2", f"{tmp}/two.pt"), nprocs=2, join=True)
        result["exact_2rank"] = torch.load(f"{tmp}/two.pt")
    worst2 = max(result["exact_2rank"].values())
    log(f"exact (2 processes, gloo): max |Δ| vs CPU sync {worst2:.2e} ({time.perf_counter() - start:.0f} s)")
    worst = max(max(result["exact"].values()), worst2)
    m = result["memory"]
    # Bounded by the batch's rows, not the table: a step may use a tenth of the table at most.
    memory_ok = args.dry_run or m["step_peak_device_bytes"] <= 0.1 * m["table_bytes"]
    result["meta"] = {
        "device": args.device,
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "args": vars(args),
        "wall_s": time.perf_counter() - started,
        "host": os.uname().nodename,
    }
    out = Path(args.out if not args.dry_run else Path(args.out).with_suffix(".dry-run.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    ok = worst <= args.tolerance and memory_ok
    log(
        f"{'PASS' if ok else 'FAIL'}: worst |Δ| {worst:.2e} (tolerance {args.tolerance:g}), step memory "
        f"{'within' if memory_ok else 'OVER'} a tenth of the table; "
        f"{time.perf_counter() - started:.0f} s; written {out}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
