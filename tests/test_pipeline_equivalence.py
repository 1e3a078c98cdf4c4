"""The NestPipe promise, measured: every pipeline schedule ends with the parameters of ``sync``.

2 and 4 gloo ranks, float64, 21 steps (the last one short), Adagrad and Adam tables (state rows
are parameters too), every embedding row, optimizer-state row and dense parameter compared to
1e-10 — for ``dbp``, ``fwp`` (N = 1, 2, 4, 8), ``nested``, with and without clustering. The
negative controls switch off the dual-buffer copy or the write-back ordering and must *fail*.
One spawn per world size runs every schedule, so the suite stays fast.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from pipeline_reference import worker

TOLERANCE = 1e-10

RUNS = [
    ("sync", {"mode": "sync"}, "adagrad"),
    ("dbp", {"mode": "dbp"}, "adagrad"),
    *[
        (f"fwp-{n}-{c}", {"mode": "fwp", "micro_batches": n, "clustering": c}, "adagrad")
        for n in (1, 2, 4, 8)
        for c in ("none", "signature")
    ],
    ("nested-4-none", {"mode": "nested", "micro_batches": 4, "clustering": "none"}, "adagrad"),
    ("nested-4-signature", {"mode": "nested", "micro_batches": 4, "clustering": "signature"}, "adagrad"),
    ("nested-8-greedy", {"mode": "nested", "micro_batches": 8, "clustering": "greedy"}, "adagrad"),
    ("sync-adam", {"mode": "sync"}, "adam"),
    ("nested-adam", {"mode": "nested", "micro_batches": 4}, "adam"),
    # negative controls
    ("nested-no-copy", {"mode": "nested", "micro_batches": 4, "dual_buffer_copy": False}, "adagrad"),
    ("dbp-no-writeback-order", {"mode": "dbp", "writeback_ordering": False}, "adagrad"),
]

_CACHE: dict[int, dict] = {}


def _results(world_size: int, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    if world_size not in _CACHE:
        tmp = tmp_path_factory.mktemp(f"pipelines{world_size}")
        out = tmp / "results.pt"
        mp.spawn(worker, args=(world_size, RUNS, str(tmp / "pg"), str(out)), nprocs=world_size, join=True)
        _CACHE[world_size] = torch.load(out)
    return _CACHE[world_size]


def _max_diff(a: dict, b: dict) -> dict[str, float]:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return {k: (a[k] - b[k]).abs().max().item() for k in a}


EXACT = [label for label, kw, _ in RUNS if kw["mode"] != "sync" and "no-" not in label]


@pytest.mark.parametrize("world_size", [2, 4])
def test_every_schedule_matches_sync(world_size, tmp_path_factory):
    results = _results(world_size, tmp_path_factory)
    failures = {}
    for label in EXACT:
        reference = results["sync-adam" if label.endswith("adam") else "sync"]
        diffs = _max_diff(results[label], reference)
        if max(diffs.values()) > TOLERANCE:
            failures[label] = {k: v for k, v in diffs.items() if v > TOLERANCE}
    assert not failures, failures
    # The comparison covers optimizer state, and training really moved the hazard rows.
    assert "item.state.sum" in results["dbp"] and "item.state.exp_avg_sq" in results["nested-adam"]
    initial = results["sync"]["item.state.sum"]
    assert initial[28].abs().max() > 0 and results["sync"]["user.state.sum"][12].abs().max() > 0


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize(
    "label,stale_rows",
    [
        # Without the dual-buffer copy, the next batch reads rows from before this batch's update.
        ("nested-no-copy", "hot rows shared by consecutive batches"),
        # Without write-back ordering, B(t+1) reads rows of B(t-1) before they reach host memory.
        ("dbp-no-writeback-order", "hazard rows in B(t-1) and B(t+1) but not B(t)"),
    ],
)
def test_negative_controls_are_detected(world_size, label, stale_rows, tmp_path_factory):
    results = _results(world_size, tmp_path_factory)
    diffs = _max_diff(results[label], results["sync"])
    assert diffs["item.weight"] > 1e-6, f"{label}: {stale_rows} went undetected: {diffs}"
