"""Hydra sweeper plugins from the ``[sweep]`` extra drive nestrec.run: a 4-trial Optuna search."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from conftest import run_nestrec

OPTUNA = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None


@pytest.mark.skipif(
    not OPTUNA, reason="hydra-optuna-sweeper is not installed (pip install -e '.[sweep]'; make setup does)"
)
def test_optuna_search_runs_four_trials_and_reports_the_best(tmp_path):
    result = run_nestrec(
        ["-m", "recipe=sasrec_ml1m", "hparams_search=sasrec_optuna", "data=fixture", "debug=smoke", "logger=none",
         "trainer.enable_progress_bar=false", "hydra.sweeper.n_trials=4"],
        tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summaries = sorted((tmp_path / "multirun").rglob("summary.json"))
    assert len(summaries) == 4
    trials = [json.loads(p.read_text()) for p in summaries]
    assert all(t["status"] == "ok" and "val/ndcg@10" in t["metrics"] for t in trials)
    [best] = list((tmp_path / "multirun").rglob("optimization_results.yaml"))
    report = yaml.safe_load(best.read_text())
    assert set(report["best_params"]) == {"model.lr", "model.dropout", "model.dim"}
    assert report["best_value"] == pytest.approx(max(t["metrics"]["val/ndcg@10"] for t in trials))


def test_missing_sweeper_plugin_is_one_line(tmp_path, monkeypatch):
    from nestrec.run import _one_line

    message = (
        "In 'hparams_search/sasrec_optuna': Could not find 'hydra/sweeper/optunaa'\n\n"
        "Available options in 'hydra/sweeper':\n\tbasic\nConfig search path:\n\tprovider=hydra"
    )
    line = _one_line(message, [])
    assert "\n" not in line and "hydra/sweeper=optunaa" in line and "pip install -e '.[sweep]'" in line
    assert "(available: basic)" in line
