"""The scaling simulator reproduces the paper's 1,536-worker table from its TorchRec row alone,
and the cost model behaves as the brief's formulas say (1/N exposure, comm-bound branch)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from nestrec.sim import PAPER_1536, SCHEDULES, CostModel, calibrate_to_paper, paper_comparison, scaling_table


def test_calibration_predicts_nestpipe_row_of_the_paper():
    rows = {(r["schedule"], r["quantity"]): r for r in paper_comparison()}
    # calibration point: exact
    assert rows["torchrec", "step_ms"]["predicted"] == pytest.approx(PAPER_1536["torchrec"]["step_ms"])
    # predictions, compared with what the paper reports
    assert rows["torchrec", "efficiency"]["predicted"] == pytest.approx(0.4434, abs=0.01)
    assert rows["nested", "step_ms"]["predicted"] == pytest.approx(1895.98, rel=0.03)
    assert rows["nested", "exposed_comm_ms"]["predicted"] == pytest.approx(154.23, rel=0.05)
    assert rows["nested", "efficiency"]["predicted"] == pytest.approx(0.9407, abs=0.015)
    assert rows["dbp", "exposed_comm_ms"]["predicted"] == pytest.approx(1169.0, rel=0.05)
    assert rows["fwp", "exposed_comm_ms"]["predicted"] == pytest.approx(160.0, rel=0.1)


def test_schedules_order_and_efficiency_trend():
    model = calibrate_to_paper()
    table = scaling_table(model, [8, 128, 1536, 4096])
    for i in range(4):
        steps = {s: table[s][i]["step_ms"] for s in SCHEDULES}
        assert steps["nested"] <= steps["dbp"] <= steps["torchrec"] <= steps["sync"]
        assert steps["nested"] <= steps["fwp"] <= steps["torchrec"]
    assert table["nested"][1]["efficiency"] == pytest.approx(1.0)  # the reference scale
    assert table["nested"][3]["efficiency"] > 0.8 > table["torchrec"][3]["efficiency"]


def test_fwp_exposure_is_one_over_n_when_compute_bound_and_larger_when_comm_bound():
    model = CostModel(dense_ms=100.0, lookup_ms=0.0, comm_ms=40.0, w0=8, micro_batches=4)
    _, exposed = model.stage5(8)
    assert exposed == pytest.approx(40.0 / 4)
    comm_bound = replace(model, comm_ms=400.0)
    _, exposed = comm_bound.stage5(8)
    assert exposed > 400.0 / 4 and exposed == pytest.approx(400.0 - (100.0 - 25.0))
    # per-call latency makes large N counter-productive: an interior optimum
    latency = replace(model, alpha_ms=3.0)
    best = min(range(1, 33), key=lambda n: replace(latency, micro_batches=n).step("fwp", 8)["step_ms"])
    assert 1 < best < 32


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule 'semisync'"):
        calibrate_to_paper().step("semisync", 128)
