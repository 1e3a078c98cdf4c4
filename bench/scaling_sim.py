"""Predict NestPipe's step time and scaling efficiency from 8 to 4,096 workers (``nestrec.sim``).

    python bench/scaling_sim.py                                   # calibrated on the paper
    python bench/scaling_sim.py --from-bench bench/results/nestpipe_bench.json   # from measured stage times

Prints the predicted-vs-reported table at 1,536 workers and the scaling table, writes JSON and
a two-panel PNG (step time and efficiency vs workers, paper points overlaid).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

from nestrec.sim import PAPER_1536, SCHEDULES, CostModel, calibrate_to_paper, paper_comparison, scaling_table

WORKERS = [8, 16, 32, 64, 128, 256, 512, 1024, 1536, 2048, 4096]


def model_from_bench(path: Path, paper: CostModel) -> CostModel:
    """Stage times measured by bench/nestpipe_bench.py at its world size; growth exponents from the paper."""
    report = json.loads(path.read_text())
    stages = report["stage_ms_per_step"]
    n = report["config"]["micro_batches"]
    comm = stages["fwp"].get("comm/a2a_fwd", 0) + stages["fwp"].get("comm/a2a_bwd", 0)
    shim = report.get("shim") or {}
    alpha = shim.get("alpha_ms", 0.0)
    return replace(
        paper,
        w0=report["world_size"],
        dense_ms=report["step_ms"]["compute"],
        lookup_ms=stages["dbp"].get("router/route", 0) + stages["dbp"].get("retrieval/retrieve", 0),
        comm_ms=max(0.0, comm - 2 * n * alpha),  # one call each way, without the N-fold latency
        alpha_ms=alpha,
        micro_batches=n,
        # CPU shards are read in place (no dual buffer to measure): keep the paper's figure then.
        dual_buffer_ms=report["dual_buffer_copy_ms"] or paper.dual_buffer_ms,
    )


def plot(table: dict, out: Path, title: str, paper_points: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for schedule in SCHEDULES:
        xs = [r["workers"] for r in table[schedule]]
        left.plot(xs, [r["step_ms"] for r in table[schedule]], marker="o", ms=3, label=schedule)
        right.plot(xs, [100 * r["efficiency"] for r in table[schedule]], marker="o", ms=3, label=schedule)
    if paper_points:
        for schedule, marker in (("torchrec", "s"), ("nested", "*")):
            row = PAPER_1536[schedule]
            left.scatter(
                [1536],
                [row["step_ms"]],
                marker=marker,
                s=120,
                c="black",
                zorder=5,
                label=f"paper {schedule} @1,536",
            )
            right.scatter([1536], [100 * row["efficiency"]], marker=marker, s=120, c="black", zorder=5)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("workers")
        ax.grid(alpha=0.3)
    left.set_ylabel("predicted step time (ms)")
    right.set_ylabel("scaling efficiency (%)")
    left.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--micro-batches", type=int, default=8)
    p.add_argument("--from-bench", type=Path, help="nestpipe_bench.py JSON to take stage times from")
    p.add_argument("--out", type=Path, default=Path("bench/results/scaling_sim.json"))
    args = p.parse_args(argv)
    paper = calibrate_to_paper(micro_batches=args.micro_batches)
    model = model_from_bench(args.from_bench, paper) if args.from_bench else paper
    table = scaling_table(model, WORKERS)
    comparison = paper_comparison(paper)

    print(
        "Calibration: TorchRec row + lookup/comm shares at 128 and 1,536 workers (paper); the rest is predicted."
    )
    print(f"{'schedule':<10}{'quantity':<18}{'predicted':>12}{'reported':>12}")
    for row in comparison:
        fmt = "{:>11.1%} " if row["quantity"] == "efficiency" else "{:>12.1f}"
        print(
            f"{row['schedule']:<10}{row['quantity']:<18}"
            + fmt.format(row["predicted"])
            + fmt.format(row["reported"])
        )
    source = f"stage times measured in {args.from_bench}" if args.from_bench else "paper calibration"
    print(
        f"\nPredicted step time (ms) / efficiency vs {model.w0} workers — {source}, N={model.micro_batches}"
    )
    print(f"{'workers':>8}" + "".join(f"{s:>18}" for s in SCHEDULES))
    for i, w in enumerate(WORKERS):
        cells = "".join(
            f"{table[s][i]['step_ms']:>10.0f} {table[s][i]['efficiency']:>6.1%}" for s in SCHEDULES
        )
        print(f"{w:>8}{cells}")
    report = {"model": asdict(model), "source": source, "paper_comparison": comparison, "scaling": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    plot(
        table,
        args.out.with_suffix(".png"),
        f"NestPipe cost model ({source})",
        paper_points=not args.from_bench,
    )
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
