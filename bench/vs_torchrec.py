"""nestrec against TorchRec on one CPU workload: step time, samples/s and the final weights.

The workload is the shape of TorchRec's own sparse-dist benchmark, small enough for 2 CPU cores:
4 tables x 100,000 rows x 64 dims, sum pooling, one feature per table, bags of 1-39 ids drawn
from Zipf(1.05), 512 samples per rank, 2 gloo ranks, SGD lr 0.05 for the tables (row-wise,
fused) and for the dense MLP, one torch thread per rank.

Every runner — nestrec's ``sync`` / ``dbp`` / ``fwp`` / ``nested`` schedules and, when TorchRec is
importable, TorchRec's ``TrainPipelineBase`` and ``TrainPipelineSparseDist`` — trains its own copy
from the same initial weights on the same batches. Runners are interleaved in chunks of steps, so
machine noise hits all of them alike; each runner's figure is the median of its chunk means, with
the min-max spread over chunks. The final tables and dense weights of every runner are compared
with nestrec ``sync``.

TorchRec is not a nestrec dependency: ``make torchrec-venv`` builds ``.venv-torchrec`` with it
(see the Makefile), and ``make bench-torchrec`` runs this file there. Without TorchRec the
nestrec runners still run (``torchrec: not importable`` in the output).

    python bench/vs_torchrec.py                     # ~2 min on 2 CPUs
    python bench/vs_torchrec.py --steps 60 --chunk 10 --only sync nested
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
from nestrec.sharding import RowWiseSGD, ShardedEmbeddingCollection
from nestrec.sharding.collection import initial_rows
from nestrec.sparse import JaggedFeatures

NESTREC_MODES = {
    "nestrec_sync": {"mode": "sync"},
    "nestrec_dbp": {"mode": "dbp"},
    "nestrec_fwp": {"mode": "fwp", "clustering": "none"},
    "nestrec_nested": {"mode": "nested", "clustering": "none"},
    # Key routing on a router thread instead of inline asynchronous collectives (the CPU default).
    "nestrec_dbp_thread": {"mode": "dbp", "router": "thread"},
    # The same schedule with the rows exchange (unique rows to the requester, pooled there).
    "nestrec_sync_rows": {"mode": "sync", "exchange": "rows"},
    "nestrec_nested_rows": {"mode": "nested", "clustering": "none", "exchange": "rows"},
}
TORCHREC_MODES = ("torchrec_base", "torchrec_sparse_dist")
DENSE_IN = 16


def torchrec_available() -> bool:
    try:
        import torchrec  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not here"
        return False
    return True


def build_tables(args) -> list[EmbeddingTableConfig]:
    return [
        EmbeddingTableConfig(f"t{i}", num_rows=args.rows, dim=args.dim, features=(f"f{i}",), pooling="sum")
        for i in range(args.tables)
    ]


def make_batches(args, rank: int) -> list[tuple[JaggedFeatures, torch.Tensor, torch.Tensor]]:
    """Bags of ``1..max_bag`` Zipf-distributed ids per sample and table, a dense vector, a label."""
    g = torch.Generator().manual_seed(4242 + rank)
    probs = 1.0 / torch.arange(1, args.rows + 1, dtype=torch.float64) ** args.zipf
    # A fixed random relabelling, so popular ids are spread over the row range (and the shards).
    relabel = torch.randperm(args.rows, generator=torch.Generator().manual_seed(7))
    batches = []
    for _ in range(args.steps):
        feats = {}
        for i in range(args.tables):
            lengths = torch.randint(1, args.max_bag + 1, (args.batch,), generator=g)
            ids = relabel[torch.multinomial(probs, int(lengths.sum()), replacement=True, generator=g)]
            feats[f"f{i}"] = (ids, lengths)
        dense = torch.randn(args.batch, DENSE_IN, generator=g)
        labels = torch.randint(0, 2, (args.batch,), generator=g).float()
        batches.append((JaggedFeatures.from_dict(feats), dense, labels))
    return batches


class DenseArch(nn.Module):
    """Pooled embeddings + dense features -> MLP -> one logit."""

    def __init__(self, args):
        super().__init__()
        torch.manual_seed(0)
        width = args.tables * args.dim + DENSE_IN
        layers: list[nn.Module] = []
        for h in args.mlp:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.mlp = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """``pooled``: every table's pooled rows side by side, ``[B, tables * dim]``."""
        return self.mlp(torch.cat([pooled, dense], dim=1)).squeeze(1)


class NestrecModel(nn.Module):
    """The ``PipelinedModel`` protocol around ``DenseArch`` (sum of per-sample BCE)."""

    def __init__(self, args):
        super().__init__()
        self.dense = DenseArch(args)
        self.names = [f"f{i}" for i in range(args.tables)]

    def sparse_features(self, batch):
        return batch[0]

    def select_samples(self, batch, index):
        return batch[0].select_samples(index), batch[1][index], batch[2][index]

    def loss_sum(self, batch, pooled):
        logits = self.dense(torch.cat([pooled[n] for n in self.names], dim=1), batch[1])
        return F.binary_cross_entropy_with_logits(logits, batch[2], reduction="sum")


class NestrecRunner:
    def __init__(self, name: str, args, rank: int, world: int):
        self.name = name
        self.model = NestrecModel(args)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=args.lr)
        schedule = dict(NESTREC_MODES[name])
        exchange = schedule.pop("exchange", "auto")
        self.tables = ShardedEmbeddingCollection(
            build_tables(args),
            optimizer=RowWiseSGD(lr=args.lr),
            init_std=args.init_std,
            seed=0,
            exchange=exchange,
        )
        # Own groups per runner: engines read ahead on threads, and runners must not interleave.
        self.tables.shard(rank, world, dist.new_group(backend="gloo"), dist.new_group(backend="gloo"))
        config = PipelineConfig(**schedule, micro_batches=args.micro_batches)
        self.engine = NestPipeEngine(
            self.model, self.tables, list(self.model.parameters()), self._dense_step, config,
            dense_group=dist.new_group(backend="gloo"),
        )  # fmt: skip
        self.iterator = None

    def _dense_step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run(self, batches, count: int, drain: bool) -> int:
        if self.iterator is None:
            self.iterator = iter(batches)
        done = 0
        while done < count or drain:
            results = self.engine.step(self.iterator)
            if not results:
                break
            done += len(results)
        return done

    def stage_ms(self) -> dict[str, float]:
        """Mean milliseconds per step of each ``lane/stage`` of the engine's timeline."""
        spans = self.engine.timeline.spans()
        steps = max(1, len({s.step for s in spans}))
        totals: dict[str, float] = {}
        for span in spans:
            key = f"{span.lane}/{span.name}"
            totals[key] = totals.get(key, 0.0) + span.ms / steps
        return dict(sorted(totals.items(), key=lambda kv: -kv[1]))

    def final_weights(self) -> dict[str, torch.Tensor]:
        out = {t.name: self.tables.gather_full(t.name) for t in self.tables.tables}
        out.update({f"dense.{k}": v.detach().clone() for k, v in self.model.dense.state_dict().items()})
        return out

    def close(self) -> None:
        self.engine.close()


class TorchrecRunner:
    """TorchRec's DistributedModelParallel with row-wise sharding and a fused SGD in backward."""

    def __init__(self, name: str, args, rank: int, world: int):
        from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        from torchrec.distributed import DistributedModelParallel
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
        from torchrec.distributed.planner.types import ParameterConstraints
        from torchrec.distributed.train_pipeline import TrainPipelineBase, TrainPipelineSparseDist
        from torchrec.distributed.types import ShardingType
        from torchrec.optim.keyed import KeyedOptimizerWrapper

        self.name, self.args = name, args
        configs = [
            EmbeddingBagConfig(
                name=f"t{i}", embedding_dim=args.dim, num_embeddings=args.rows, feature_names=[f"f{i}"]
            )
            for i in range(args.tables)
        ]
        dense = DenseArch(args)
        model = _TorchrecModel(EmbeddingBagCollection(tables=configs, device=torch.device("meta")), dense)

        class RowWiseOnCpuSharder(EmbeddingBagCollectionSharder):
            """TorchRec offers row-wise sharding on CUDA only; its CPU kernels and gloo run it."""

            def sharding_types(self, compute_device_type: str) -> list[str]:
                return [*super().sharding_types(compute_device_type), ShardingType.ROW_WISE.value]

        sharder = RowWiseOnCpuSharder(
            # TorchRec's table gradient is that of the mean of the ranks' losses, as nestrec's
            # (grad_scale="world") and DDP's: the same lr trains the same maths (checked below).
            fused_params={"optimizer": _sgd_type(), "learning_rate": args.lr}
        )
        constraints = {
            f"t{i}": ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value])
            for i in range(args.tables)
        }
        group = dist.new_group(backend="gloo")
        topology = Topology(world_size=world, compute_device="cpu")
        plan = EmbeddingShardingPlanner(topology=topology, constraints=constraints).collective_plan(
            model, [sharder], group
        )
        self.model = DistributedModelParallel(
            model, device=torch.device("cpu"), plan=plan, sharders=[sharder], env=_sharding_env(group)
        )
        _load_rows(self.model, args)
        dense_params = {k: v for k, v in self.model.named_parameters() if "ebc" not in k}
        self.optimizer = KeyedOptimizerWrapper(dense_params, lambda p: torch.optim.SGD(p, lr=args.lr))
        cls = TrainPipelineBase if name == "torchrec_base" else TrainPipelineSparseDist
        self.pipeline = cls(self.model, self.optimizer, torch.device("cpu"))
        self.iterator = None

    def run(self, batches, count: int, drain: bool) -> int:
        if self.iterator is None:
            self.iterator = iter([_to_torchrec_batch(b) for b in batches])
        done = 0
        while done < count or drain:
            try:
                self.pipeline.progress(self.iterator)
            except StopIteration:
                break
            done += 1
        return done

    def final_weights(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in self.model.state_dict().items():
            if "embedding_bags" in key:
                table = key.split(".")[-2]
                full = torch.zeros(self.args.rows, self.args.dim)
                for shard in value.local_shards():
                    start = shard.metadata.shard_offsets[0]
                    full[start : start + shard.tensor.shape[0]] = shard.tensor
                dist.all_reduce(full)
                out[table] = full
            elif "dense." in key:
                out["dense." + key.split("dense.", 1)[1]] = value.detach().clone()
        return out

    def close(self) -> None:
        pass


class _TorchrecModel(nn.Module):
    """``forward(batch) -> (loss, logits)``, what TorchRec's train pipelines call."""

    def __init__(self, ebc, dense):
        super().__init__()
        self.ebc, self.dense = ebc, dense

    def forward(self, batch):
        pooled = self.ebc(batch.sparse_features)
        logits = self.dense(pooled.values(), batch.dense_features)  # a KeyedTensor, keys in table order
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, logits.detach()


def _sgd_type():
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    return EmbOptimType.EXACT_SGD


def _sharding_env(group):
    from torchrec.distributed.types import ShardingEnv

    return ShardingEnv.from_process_group(group)


def _load_rows(model, args) -> None:
    """Each local shard starts from nestrec's initial rows for exactly its row range."""
    tables = {t.name: t for t in build_tables(args)}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if "embedding_bags" not in key:
                continue
            table = tables[key.split(".")[-2]]
            for shard in value.local_shards():
                start = shard.metadata.shard_offsets[0]
                ids = torch.arange(start, start + shard.tensor.shape[0])
                shard.tensor.copy_(initial_rows(table, ids, seed=0, init_std=args.init_std))


def _to_torchrec_batch(batch):
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    features, dense, labels = batch
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=features.keys, values=features.values, lengths=features.lengths
    )
    return Batch(dense_features=dense, sparse_features=kjt, labels=labels)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(rank: int, args, init_file: str, out_file: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.world_size)
    try:
        batches = make_batches(args, rank)
        names = [n for n in args.only if n in NESTREC_MODES]
        runners: dict = {n: NestrecRunner(n, args, rank, args.world_size) for n in names}
        initial_weights = (
            next(iter(runners.values())).final_weights() if args.save_weights and runners else None
        )
        if args.torchrec:
            for n in TORCHREC_MODES:
                if n in args.only:
                    runners[n] = TorchrecRunner(n, args, rank, args.world_size)
        chunk_ms: dict[str, list[float]] = {n: [] for n in runners}
        rounds = -(-args.steps // args.chunk)
        for r in range(rounds):
            for n, runner in runners.items():  # interleaved: the same machine state for everyone
                dist.barrier()
                start = time.perf_counter()
                done = runner.run(batches, args.chunk, drain=r == rounds - 1)
                if done:
                    chunk_ms[n].append((time.perf_counter() - start) * 1e3 / done)
        stages = {n: r.stage_ms() for n, r in runners.items() if isinstance(r, NestrecRunner)}
        weights = {n: runner.final_weights() for n, runner in runners.items()}
        for runner in runners.values():
            runner.close()
        reference_name = "nestrec_sync" if "nestrec_sync" in weights else next(iter(weights))
        reference = weights[reference_name]
        per_key = {
            n: {k: (w[k] - reference[k]).abs().max().item() for k in reference} for n, w in weights.items()
        }
        diffs = {n: max(d.values()) for n, d in per_key.items()}
        if rank == 0 and args.save_weights:
            torch.save({"initial": initial_weights, **weights}, args.save_weights)
        if rank == 0:
            torch.save(
                {
                    "chunk_ms": chunk_ms,
                    "diffs": diffs,
                    "per_key": per_key,
                    "stages": stages,
                    "reference": reference_name,
                    "rss_mb": _peak_rss_mb(),
                },
                out_file,
            )
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--chunk", type=int, default=5, help="steps per runner before switching")
    p.add_argument("--batch", type=int, default=512, help="samples per rank")
    p.add_argument("--tables", type=int, default=4)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--max-bag", type=int, default=39, help="bags hold 1..max-bag ids")
    p.add_argument("--zipf", type=float, default=1.05)
    p.add_argument("--mlp", type=int, nargs="+", default=[512, 256])
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--init-std", type=float, default=0.01)
    p.add_argument("--micro-batches", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    p.add_argument("--only", nargs="+", default=[*NESTREC_MODES, *TORCHREC_MODES])
    p.add_argument("--out", default="bench/results/vs_torchrec.json")
    p.add_argument("--save-weights", default=None, help="write rank 0's initial and final weights here (.pt)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.only) - set(NESTREC_MODES) - set(TORCHREC_MODES))
    if unknown:
        p.error(f"unknown runner(s) {unknown}; known: {', '.join([*NESTREC_MODES, *TORCHREC_MODES])}")
    args.torchrec = torchrec_available() and any(n in args.only for n in TORCHREC_MODES)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args, f"{tmp}/pg", f"{tmp}/r.pt"), nprocs=args.world_size, join=True)
        raw = torch.load(f"{tmp}/r.pt")
    report = {
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "torchrec": args.torchrec,
        "runners": {},
        "weights_reference": raw["reference"],
        "peak_rss_mb_rank0_all_runners": raw["rss_mb"],
        "wall_s": 0.0,
    }
    for name, chunks in raw["chunk_ms"].items():
        median = statistics.median(chunks)
        report["runners"][name] = {
            "step_ms": median,
            "spread_ms": [min(chunks), max(chunks)],
            "chunks": len(chunks),
            "samples_per_s": args.batch * args.world_size / median * 1e3,
            "max_abs_weight_diff": raw["diffs"][name],
        }
    report["nestrec_stage_ms_per_step_rank0"] = raw["stages"]
    report["wall_s"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(report, indent=2))
    print_report(report)
    return report


def print_report(report: dict) -> None:
    c = report["config"]
    print(
        f"vs TorchRec — {c['world_size']} gloo ranks, {c['tables']} tables x {c['rows']:,} x {c['dim']}, "
        f"{c['batch']} samples/rank, bags 1-{c['max_bag']} Zipf({c['zipf']}), {c['threads']} thread/rank"
    )
    if not report["torchrec"]:
        print("torchrec: not importable here (make torchrec-venv; make bench-torchrec)")
    runners = report["runners"]
    base = runners.get("torchrec_sparse_dist", runners.get("nestrec_sync"))
    base_name = "torchrec_sparse_dist" if "torchrec_sparse_dist" in runners else "nestrec_sync"
    print(
        f"{'runner':<24}{'step ms':>9}{'spread':>17}{'samples/s':>11}{'vs ' + base_name:>26}{'max|Δw|':>10}"
    )
    for name, r in runners.items():
        lo, hi = r["spread_ms"]
        print(
            f"{name:<24}{r['step_ms']:>9.1f}{f'{lo:.1f}-{hi:.1f}':>17}{r['samples_per_s']:>11,.0f}"
            f"{base['step_ms'] / r['step_ms']:>25.2f}x{r['max_abs_weight_diff']:>10.1e}"
        )
    for name, stages in report["nestrec_stage_ms_per_step_rank0"].items():
        top = ", ".join(f"{k} {v:.1f}" for k, v in list(stages.items())[:7])
        print(f"  {name} stages (ms/step, rank 0): {top}")
    print(f"weights compared with {report['weights_reference']}; wall {report['wall_s']:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(0 if main() else 1)
