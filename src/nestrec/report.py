"""``python -m nestrec.report DIR``: turn a sweep's ``summary.json`` files into a table and a plot.

Every job of ``python -m nestrec.run -m ...`` writes ``summary.json`` in its own directory; this
collects them (recursively), labels each job by its Hydra overrides, and writes ``report.md`` (a
markdown table, also printed), ``report.png`` (the chosen metrics per job) and ``report_curves.png``
(training loss and validation NDCG@10 over steps, from the runs' CSV or W&B offline logs) into ``DIR``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["collect", "markdown_table", "plot", "main"]

DEFAULT_METRICS = ("test/hr@10", "test/ndcg@10", "val/ndcg@10")


def _overrides(job_dir: Path) -> list[str]:
    overrides_file = job_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.exists():
        return []
    import yaml

    return [o for o in yaml.safe_load(overrides_file.read_text()) or [] if not o.startswith("hydra.")]


def collect(root: Path) -> list[dict]:
    """One row per ``summary.json`` under ``root``, sorted by job directory.

    Each row's ``job`` label is the Hydra overrides that differ between the jobs (what the sweep
    varied), falling back to the job directory.
    """
    paths = sorted(root.rglob("summary.json"), key=lambda p: (len(p.parts), str(p)))
    rows = []
    for path in paths:
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        rows.append({"path": str(path.parent), "overrides": _overrides(path.parent), **summary})
    common = set.intersection(*(set(r["overrides"]) for r in rows)) if len(rows) > 1 else set()
    for row in rows:
        varying = [o for o in row["overrides"] if o not in common]
        job_dir = Path(row["path"])
        row["job"] = " ".join(varying) or str(job_dir.relative_to(root) if job_dir != root else job_dir.name)
    return rows


def markdown_table(rows: list[dict], metrics: tuple[str, ...] = DEFAULT_METRICS) -> str:
    header = ["job", "recipe", *metrics, "epochs", "wall time (s)", "config"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        values = [row["job"], str(row.get("recipe"))]
        values += [f"{row['metrics'][m]:.4f}" if m in row.get("metrics", {}) else "–" for m in metrics]
        values += [
            str(row.get("epochs", "–")),
            f"{row.get('wall_time_s', float('nan')):.1f}",
            row.get("config_hash", "–"),
        ]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, metrics: tuple[str, ...] = DEFAULT_METRICS) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    present = [m for m in metrics if any(m in r.get("metrics", {}) for r in rows)]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(rows) * max(1, len(present))), 3.6))
    width = 0.8 / max(1, len(present))
    x = np.arange(len(rows))
    for i, metric in enumerate(present):
        values = [r["metrics"].get(metric, np.nan) for r in rows]
        bars = ax.bar(x + i * width, values, width, label=metric)
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks(
        x + width * (len(present) - 1) / 2, [r["job"] for r in rows], rotation=20, ha="right", fontsize=8
    )
    ax.set_ylabel("metric")
    ax.set_title(f"nestrec sweep: {rows[0].get('recipe')}" if rows else "nestrec sweep")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(rows: list[dict], path: Path, metrics: tuple[str, ...] | None = None) -> Path | None:
    """Learning curves (training loss, the monitored validation metric) of every run, read from its
    CSV metrics (``logger=csv``) or its W&B offline runs (the default logger); None if it has neither."""
    metrics = metrics or ("train/loss", (rows[0].get("monitor") if rows else None) or "val/ndcg@10")
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nestrec.wandb_offline import offline_runs

    series = []
    for row in rows:
        for metrics_csv in sorted(Path(row["path"]).rglob("metrics.csv")):
            with metrics_csv.open() as fh:
                records = list(csv.DictReader(fh))
            series.append((row["job"], records))
        if not any(Path(row["path"]).rglob("metrics.csv")):
            for run in offline_runs(row["path"]):  # W&B offline runs: the same curves, from history
                records = [
                    {"step": r["trainer/global_step"], **r} for r in run.history if "trainer/global_step" in r
                ]
                series.append((row["job"], records))
    if not series:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.6))
    for ax, metric in zip(axes, metrics):
        for label, records in series:
            points = [(int(r["step"]), float(r[metric])) for r in records if r.get(metric) not in (None, "")]
            if points:
                ax.plot(
                    *zip(*points), label=label, marker="o" if metric.startswith("val") else None, markersize=3
                )
        ax.set_xlabel("step")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nestrec.report", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="a sweep directory (or any tree of run dirs)")
    parser.add_argument(
        "--metrics", nargs="+", default=list(DEFAULT_METRICS), help="metric keys for table and plot"
    )
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        print(f"error: {args.directory} is not a directory", file=sys.stderr)
        return 2
    try:
        rows = collect(args.directory)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not rows:
        print(f"error: no summary.json under {args.directory}", file=sys.stderr)
        return 2
    metrics = tuple(args.metrics)
    table = markdown_table(rows, metrics)
    (args.directory / "report.md").write_text(table + "\n")
    png = plot(rows, args.directory / "report.png", metrics)
    curves = plot_curves(rows, args.directory / "report_curves.png")
    print(table)
    print(f"\nwrote {args.directory / 'report.md'}, {png}" + (f" and {curves}" if curves else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
