"""NestPipe benchmark: step time of sync / dbp / fwp / nested against a compute-only bound.

One invocation, W processes (gloo on CPU), one synthetic DLRM-like model (Zipf-skewed ids, a
dense MLP big enough to hide communication behind). Every mode trains its own copy from the same
initial weights on the same batch stream; modes are *interleaved* in chunks of steps, so machine
noise hits all of them alike. Printed as a table and written as JSON (``--out``).

On a 2-core CPU box, loopback gloo has no network latency worth hiding, so ``--shim-alpha-ms``
/ ``--shim-gbps`` (on by default here) add the design brief's cost model to every embedding
collective: a sleep of ``alpha + bytes / bandwidth`` that releases the GIL like a NIC transfer
would. The dense all-reduce is a real gloo all-reduce, unshimmed, identical in every mode. The
output says whether the shim was on: numbers with the shim are a *demonstration of overlap*
under a modelled network, not a measurement of a real cluster.

    python bench/nestpipe_bench.py                       # ~1-2 min on 2 CPUs
    python bench/nestpipe_bench.py --no-shim             # raw loopback gloo
    python bench/nestpipe_bench.py --device cuda --world-size 1   # one GPU: NCCL data plane, no peers
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from nestrec.embedding import EmbeddingTableConfig
from nestrec.pipeline.clustering import cluster_samples, sample_keys
from nestrec.pipeline.engine import NestPipeEngine, PipelineConfig
from nestrec.sharding import RowWiseAdagrad, ShardedEmbeddingCollection, comm
from nestrec.sparse import JaggedFeatures

MODES = {
    "sync": {"mode": "sync"},
    "dbp": {"mode": "dbp"},
    "fwp": {"mode": "fwp", "clustering": "signature"},
    "nested": {"mode": "nested", "clustering": "signature"},
    "nested_noclust": {"mode": "nested", "clustering": "none"},
}


def build_tables(args) -> list[EmbeddingTableConfig]:
    return [
        EmbeddingTableConfig(f"t{i}", num_rows=args.rows, dim=args.dim, features=(f"f{i}",), pooling="sum")
        for i in range(args.tables)
    ]


def make_stream(args, rank: int) -> list[tuple[JaggedFeatures, torch.Tensor, torch.Tensor]]:
    """Zipf-skewed multi-hot ids (``--ids`` per sample per table), a dense vector, a label.

    Samples have interests, the structure key-centric clustering exploits: each sample belongs
    to one of ``--topics`` topics; with probability ``--topic-share`` an id comes from its
    topic's own Zipf-ranked vocabulary of ``--topic-rows`` rows, otherwise from the global Zipf
    over all rows (whose head is shared by everyone).
    """
    g = torch.Generator().manual_seed(1000 + rank)
    global_probs = 1.0 / torch.arange(1, args.rows + 1, dtype=torch.float64) ** args.zipf
    topic_rows = min(args.topic_rows, args.rows)
    topic_probs = 1.0 / torch.arange(1, topic_rows + 1, dtype=torch.float64) ** args.zipf
    vocab = torch.stack(
        [
            torch.randperm(args.rows, generator=torch.Generator().manual_seed(77 + t))[:topic_rows]
            for t in range(args.topics)
        ]
    )
    batches = []
    for _ in range(args.steps):
        b, n = args.batch, args.batch * args.ids
        topic = torch.randint(0, args.topics, (b,), generator=g).repeat_interleave(args.ids)
        feats = {}
        for i in range(args.tables):
            from_topic = torch.rand(n, generator=g) < args.topic_share
            topic_ids = vocab[topic, torch.multinomial(topic_probs, n, replacement=True, generator=g)]
            global_ids = torch.multinomial(global_probs, n, replacement=True, generator=g)
            ids = torch.where(from_topic, topic_ids, global_ids)
            feats[f"f{i}"] = (ids, torch.full((b,), args.ids, dtype=torch.long))
        dense = torch.randn(b, 16, generator=g)
        labels = torch.randint(0, 2, (b,), generator=g).float()
        batches.append((JaggedFeatures.from_dict(feats), dense, labels))
    return batches


class Model(nn.Module):
    """Pooled embeddings + dense features -> MLP -> logit (the dense work FWP hides comm behind)."""

    def __init__(self, args):
        super().__init__()
        torch.manual_seed(0)
        width = args.tables * args.dim + 16
        layers: list[nn.Module] = []
        for h in args.mlp:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))
        self.names = [f"f{i}" for i in range(args.tables)]

    def sparse_features(self, batch):
        return batch[0]

    def select_samples(self, batch, index):
        return batch[0].select_samples(index), batch[1][index], batch[2][index]

    def loss_sum(self, batch, pooled):
        weight = self.mlp[0].weight
        dense, labels = batch[1].to(weight.device, weight.dtype), batch[2].to(weight.device, weight.dtype)
        x = torch.cat([pooled[n].to(weight.dtype) for n in self.names] + [dense], dim=1)
        return F.binary_cross_entropy_with_logits(self.mlp(x).squeeze(1), labels, reduction="sum")


class Runner:
    """One mode's model, optimizer and engine, advanced a chunk of steps at a time."""

    def __init__(
        self, name: str, args, rank: int, world: int, groups, device: torch.device, dtype=torch.float32
    ):
        self.name = name
        self.model = Model(args).to(device, dtype)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.device = device
        self.tables = ShardedEmbeddingCollection(
            build_tables(args), optimizer=RowWiseAdagrad(lr=0.05), init_std=0.05, seed=0, dtype=dtype
        )
        self.tables.shard(rank, world, *groups, device=device)
        self.chunk_ms: list[float] = []
        self.steps = 0
        self.bytes = 0
        self.engine = None
        if name != "compute":
            config = PipelineConfig(**MODES[name], micro_batches=args.micro_batches)
            self.engine = NestPipeEngine(
                self.model, self.tables, list(self.model.parameters()), self._dense_step, config
            )
        else:
            # Compute-only bound: the same dense work on locally materialised rows, no communication.
            self.local = {
                f"f{i}": torch.randn(args.rows, args.dim, generator=torch.Generator().manual_seed(i)) * 0.05
                for i in range(args.tables)
            }

    def _dense_step(self):
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run_chunk(self, iterator: Iterator, count: int, drain: bool) -> None:
        start, done = time.perf_counter(), 0
        before = comm.COMM_BYTES["rows"] + comm.COMM_BYTES["grads"]
        while done < count or (drain and self.engine is not None):
            if self.engine is None:
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
                self._compute_only(batch)
                done += 1
                continue
            results = self.engine.step(iterator)
            if not results:
                break
            done += len(results)
        self.bytes += comm.COMM_BYTES["rows"] + comm.COMM_BYTES["grads"] - before
        if done:
            self.chunk_ms.append((time.perf_counter() - start) * 1e3 / done)
            self.steps += done

    def _compute_only(self, batch) -> None:
        features = batch[0]
        pooled = {}
        for name, (values, lengths) in features.split().items():
            rows = self.local[name][values].to(self.device)
            pooled[name] = torch.segment_reduce(rows, "sum", lengths=lengths.to(self.device), axis=0)
        loss = self.model.loss_sum(batch, pooled)
        (loss / len(batch[2])).backward()
        self._dense_step()


def exactness_check(args, rank: int, groups, device, stream) -> dict[str, float]:
    """Replay the first steps of every schedule in float64 and compare final parameters with sync.

    float64 because row-wise Adagrad's first step moves a row by ±lr whatever the gradient's
    size, so float32 summation-order noise on a near-zero gradient flips whole updates; the
    equality the pipelines promise is exact maths, which float64 shows to ~1e-12.
    """
    shim = comm.get_latency_shim()
    comm.set_latency_shim(None)  # timing is over; no need to sleep
    runners = {n: Runner(n, args, rank, args.world_size, groups(), device, torch.float64) for n in MODES}
    for runner in runners.values():
        runner.run_chunk(iter(stream), len(stream), drain=True)
    reference, diffs = runners["sync"], {}
    for n, runner in runners.items():
        if n == "sync":
            continue
        d = max(
            (a - b).abs().max().item()
            for a, b in zip(runner.model.parameters(), reference.model.parameters())
        )
        for t in runner.tables.tables:
            d = max(
                d,
                (runner.tables.gather_full(t.name) - reference.tables.gather_full(t.name)).abs().max().item(),
            )
        diffs[n] = d
    for runner in runners.values():
        runner.engine.close()
    if shim is not None:
        comm.set_latency_shim(shim.alpha_s * 1e3, shim.bytes_per_s * 8 / 1e9)
    return diffs


def worker(rank: int, args, init_file: str, out_file: str) -> None:
    torch.set_num_threads(max(1, args.threads))
    device = torch.device(args.device if args.device == "cpu" else f"{args.device}:{rank}")
    backend = "gloo" if args.device == "cpu" else "nccl"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=args.world_size)
    try:

        def groups() -> tuple:
            # Each runner gets its own two groups: engines read ahead on background threads, so
            # two modes sharing a group could interleave their collectives differently per rank.
            return dist.new_group(backend=backend), dist.new_group(backend=backend)

        if not args.no_shim:
            comm.set_latency_shim(args.shim_alpha_ms, args.shim_gbps)
        names = ["sync", "dbp", "fwp", "nested", "nested_noclust", "compute"]
        runners = {n: Runner(n, args, rank, args.world_size, groups(), device) for n in names}
        stream = make_stream(args, rank)
        iterators = {n: iter(stream) for n in names}
        rounds = -(-args.steps // args.chunk)
        for r in range(rounds):
            for n in names:  # interleaved: every mode sees the same machine state each round
                runners[n].run_chunk(iterators[n], args.chunk, drain=r == rounds - 1)
        # Per-stage figures from the engines' timelines.
        fwp_engine = runners["fwp"].engine
        exposed = sum(
            s.ms
            for s in fwp_engine.timeline.spans()
            if s.lane == "main" and s.name in ("wait:a2a_fwd", "wait:a2a_bwd")
        )
        total = sum(s.ms for s in fwp_engine.timeline.spans() if s.lane == "comm")
        copies = [s.ms for s in runners["nested"].engine.timeline.spans() if s.name == "dual_buffer_copy"]
        diffs = exactness_check(args, rank, groups, device, stream[: args.check_steps])
        for runner in runners.values():
            if runner.engine is not None:
                runner.engine.close()
        if rank == 0:
            runners["nested"].engine.timeline.write_chrome_trace(
                Path(args.out).with_suffix(".trace.json"), set(range(args.steps - 4, args.steps))
            )
            runners["nested"].engine.timeline.plot(
                Path(args.out).with_suffix(".timeline.png"),
                set(range(args.steps - 4, args.steps)),
                title=f"nested, N={args.micro_batches}, rank 0 (last 4 steps)",
            )
            result = {
                n: {"chunk_ms": r.chunk_ms, "steps": r.steps, "a2a_bytes_per_step": r.bytes / max(1, r.steps)}
                for n, r in runners.items()
            }
            result["_stages"] = {}
            for n, r in runners.items():
                if r.engine is None:
                    continue
                totals: dict[str, float] = {}
                for span in r.engine.timeline.spans():
                    key = f"{span.lane}/{span.name}"
                    totals[key] = totals.get(key, 0.0) + span.ms / r.steps
                result["_stages"][n] = dict(sorted(totals.items()))
            result["_fwp_exposed_comm"] = {"exposed_ms": exposed, "comm_ms": total}
            result["_dual_buffer_copy_ms"] = copies
            result["_diffs"] = diffs
            torch.save(result, out_file)
    finally:
        dist.destroy_process_group()


def clustering_bytes(args) -> dict[str, float]:
    """Rows shipped per step (sum over micro-batches of unique ids) for random vs clustered splits.

    What clustering can save under the ``rows`` exchange; the ``pooled`` exchange (the default for
    these pooling tables) ships one partial sum per sample and table, so the split does not matter.
    """
    out = {}
    batches = make_stream(args, 0)[:8]
    feature_table = {f"f{i}": f"t{i}" for i in range(args.tables)}
    for method in ("none", "signature", "greedy"):
        total = 0
        for features, _, _ in batches:
            keys = sample_keys(features, feature_table)
            perm = torch.randperm(len(keys), generator=torch.Generator().manual_seed(0))
            keys = [keys[i] for i in perm.tolist()]  # "none" = a random split
            total += sum(cluster_samples(keys, args.micro_batches, method).unique_keys(keys))
        out[method] = total / len(batches) * args.dim * 4 * 2  # rows + gradients, float32
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--chunk", type=int, default=5, help="steps per mode before switching (interleaving)")
    p.add_argument("--batch", type=int, default=256, help="local batch per rank")
    p.add_argument("--tables", type=int, default=2)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--ids", type=int, default=8, help="ids per sample per table")
    p.add_argument("--zipf", type=float, default=1.05)
    p.add_argument("--topics", type=int, default=16, help="sample interest groups (see make_stream)")
    p.add_argument("--topic-rows", type=int, default=500)
    p.add_argument("--topic-share", type=float, default=0.5)
    p.add_argument("--mlp", type=int, nargs="+", default=[1024, 1024, 512])
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--check-steps", type=int, default=12, help="steps of the float64 exactness replay")
    p.add_argument("--no-shim", action="store_true", help="no injected latency: raw loopback gloo")
    p.add_argument("--shim-alpha-ms", type=float, default=0.5)
    p.add_argument("--shim-gbps", type=float, default=0.25)
    p.add_argument("--out", default="bench/results/nestpipe_bench.json")
    args = p.parse_args(argv)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args, f"{tmp}/pg", f"{tmp}/r.pt"), nprocs=args.world_size, join=True)
        raw = torch.load(f"{tmp}/r.pt")
    step_ms = {
        n: statistics.median(raw[n]["chunk_ms"])
        for n in ("sync", "dbp", "fwp", "nested", "nested_noclust", "compute")
    }
    fwp = raw["_fwp_exposed_comm"]
    copies = raw["_dual_buffer_copy_ms"]
    report = {
        "shim": None if args.no_shim else {"alpha_ms": args.shim_alpha_ms, "gbps": args.shim_gbps},
        "device": args.device,
        "world_size": args.world_size,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "step_ms": step_ms,
        "speedup_vs_sync": {n: step_ms["sync"] / v for n, v in step_ms.items()},
        "nested_over_compute_bound": step_ms["nested"] / step_ms["compute"],
        "exposed_comm_ratio_fwp": fwp["exposed_ms"] / max(fwp["comm_ms"], 1e-9),
        "exposed_comm_ratio_prediction": 1 / args.micro_batches,
        "stage_ms_per_step": raw["_stages"],
        "dual_buffer_copy_ms": statistics.median(copies) if copies else 0.0,
        "a2a_bytes_per_step": {
            n: raw[n]["a2a_bytes_per_step"] for n in ("sync", "dbp", "fwp", "nested", "nested_noclust")
        },
        "clustering_row_bytes_per_step": clustering_bytes(args),
        "max_abs_diff_vs_sync": raw["_diffs"],
        "max_abs_diff_note": "float64 replay of the first --check-steps steps, every table row and dense parameter",
        "wall_s": time.perf_counter() - started,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print_report(report)
    return report


def print_report(r: dict) -> None:
    shim = r["shim"]
    print(
        f"NestPipe benchmark — {r['world_size']} processes, device={r['device']}, "
        + (
            f"latency shim ON (alpha={shim['alpha_ms']} ms/call, {shim['gbps']} Gbit/s)"
            if shim
            else "no shim (raw gloo)"
        )
    )
    print(f"{'mode':<16}{'step ms':>10}{'vs sync':>10}{'row+grad bytes/step':>22}{'max|Δ| f64':>17}")
    for n, ms in r["step_ms"].items():
        diff = r["max_abs_diff_vs_sync"].get(n)
        nbytes = r["a2a_bytes_per_step"].get(n)
        print(
            f"{n:<16}{ms:>10.1f}{r['speedup_vs_sync'][n]:>9.2f}x"
            f"{(f'{nbytes:,.0f}' if nbytes is not None else '-'):>22}{(f'{diff:.1e}' if diff is not None else '-'):>17}"
        )
    print(
        f"FWP exposed-communication ratio {r['exposed_comm_ratio_fwp']:.3f} (1/N prediction {r['exposed_comm_ratio_prediction']:.3f})"
    )
    print(
        f"nested / compute-only bound: {r['nested_over_compute_bound']:.2f}; dual-buffer copy {r['dual_buffer_copy_ms']:.2f} ms (median; 0 when shards are read in place, as on CPU)"
    )
    c = r["clustering_row_bytes_per_step"]
    print(
        f"rows-exchange micro-batch row+grad bytes/step (one rank; the pooled exchange sends one partial "
        f"sum per sample whatever the split): random split {c['none']:,.0f}, signature {c['signature']:,.0f} "
        f"({c['signature'] / c['none']:.2f}x), greedy {c['greedy']:,.0f} ({c['greedy'] / c['none']:.2f}x)"
    )
    print(f"wall time {r['wall_s']:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(0 if main() else 1)
