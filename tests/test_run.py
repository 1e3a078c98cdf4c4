"""End-to-end runs of ``python -m nestrec.run`` as subprocesses, exactly as a user types them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from conftest import real_data_dir, run_nestrec
from nestrec.wandb_offline import offline_runs

FIXTURE = ["data=fixture", "debug=smoke", "trainer.enable_progress_bar=false"]


def _env(tmp_path: Path) -> dict:
    return {"NESTREC_DATA_DIR": str(tmp_path / "data")}


def _summaries(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.rglob("summary.json"))]


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_smoke_run_writes_summary_checkpoints_and_offline_wandb(tmp_path):
    result = _ok(run_nestrec(["recipe=sasrec_ml1m", *FIXTURE], tmp_path, env_extra=_env(tmp_path)))
    assert "test: HR@10=" in result.stdout and "NDCG@10=" in result.stdout
    [summary] = _summaries(tmp_path / "outputs")
    run_dir = Path(summary["output_dir"])
    assert summary["status"] == "ok" and summary["recipe"] == "sasrec_ml1m"
    assert 0.0 <= summary["metrics"]["test/ndcg@10"] <= summary["metrics"]["test/hr@10"] <= 1.0
    assert summary["metrics"]["test/overall/count"] == summary["data"]["test_rows"]
    assert len(summary["config_hash"]) == 16 and summary["versions"]["torch"] and summary["wall_time_s"] > 0
    assert Path(summary["best_checkpoint"]).exists() and (run_dir / "checkpoints" / "last.ckpt").exists()
    # W&B ran offline: an offline run directory with its .wandb log holding the logged metric names.
    [offline] = list((run_dir / "wandb").glob("offline-run-*"))
    [log] = list(offline.glob("run-*.wandb"))
    payload = log.read_bytes()
    assert payload.startswith(b":W&B") and b"test/ndcg@10" in payload and b"train/loss" in payload
    [run] = offline_runs(run_dir)
    assert run.job_type == "train" and run.group.startswith("sasrec_ml1m-") and "data=fixture" in run.tags
    assert run.config["model"]["dim"] == 64 and run.config["run"]["monitor"] == "val/ndcg@10"
    assert {("sasrec_ml1m-checkpoint", "model"), ("sasrec_ml1m-summary", "results")} <= set(run.artifacts)
    assert any("train/loss" in row for row in run.history)
    assert "[nestrec] upload them with: wandb sync " in result.stdout
    _ok(run_nestrec([str(run_dir)], tmp_path, module="nestrec.report"))  # curves from W&B, no CSV
    assert (run_dir / "report_curves.png").stat().st_size > 5_000


def test_csv_logger_and_resume_from_checkpoint(tmp_path):
    _ok(run_nestrec(["recipe=sasrec_ml1m", *FIXTURE, "logger=csv"], tmp_path, env_extra=_env(tmp_path)))
    [first] = _summaries(tmp_path / "outputs")
    run_dir = Path(first["output_dir"])
    [metrics_csv] = list(run_dir.rglob("metrics.csv"))
    rows = list(csv.DictReader(metrics_csv.open()))
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/ndcg@10") for r in rows)
    assert not (run_dir / "wandb").exists()
    _ok(run_nestrec([str(run_dir)], tmp_path, module="nestrec.report"))
    assert (run_dir / "report_curves.png").stat().st_size > 5_000

    # Resuming continues from the saved epoch, as Trainer.fit(ckpt_path=...) does.
    last = run_dir / "checkpoints" / "last.ckpt"
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    _ok(run_nestrec(["recipe=sasrec_ml1m", *FIXTURE, "logger=none", f"run.ckpt_path={last}", "trainer.max_epochs=3"],
                    resumed, env_extra=_env(tmp_path)))  # fmt: skip
    [second] = _summaries(resumed / "outputs")
    assert second["epochs"] == 3 and second["global_step"] == first["global_step"] * 3 // 2


def test_two_value_sweep_and_report(tmp_path):
    sweep = tmp_path / "sweep"
    result = _ok(run_nestrec(["-m", "recipe=sasrec_ml1m", *FIXTURE, "logger=wandb", "model.dim=16,32"], tmp_path,
                             env_extra={**_env(tmp_path), "NESTREC_SWEEP_DIR": str(sweep)}))  # fmt: skip
    summaries = _summaries(sweep)
    assert len(summaries) == 2 and len({s["config_hash"] for s in summaries}) == 2
    # W&B: the sweep's jobs are one group (named for the sweep, not the job number every sweep
    # shares), each job tagged with its own override.
    runs = offline_runs(sweep)
    assert len(runs) == 2 and len({r.group for r in runs}) == 1, [r.group for r in runs]
    assert f"sweep-{sweep.parent.name}-{sweep.name}" in runs[0].group
    assert sorted(t for r in runs for t in r.tags if t.startswith("model.dim=")) == [
        "model.dim=16",
        "model.dim=32",
    ]
    report = _ok(run_nestrec([str(sweep)], tmp_path, module="nestrec.report"))
    assert "| model.dim=16 |" in report.stdout and "| model.dim=32 |" in report.stdout
    assert (sweep / "report.md").exists() and (sweep / "report.png").stat().st_size > 5_000
    assert (sweep / "report_curves.png").stat().st_size > 5_000  # curves from the W&B offline history
    assert result.stdout.count("test: HR@10=") == 2


def test_ddp_two_processes_and_ddp_sweep(tmp_path):
    """Multi-process runs through Lightning's own popen launcher under Hydra (gloo on CPU).

    The sweep is the case of Lightning #18175: children re-run the sweep in lock-step, so the sweep
    directory must be pinned for all ranks or a second tree appears.
    """
    ddp = ["strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "logger=none"]
    sweep_root = tmp_path / "sweep-cwd"
    sweep_root.mkdir()
    _ok(
        run_nestrec(
            ["-m", "recipe=sasrec_ml1m", *FIXTURE, *ddp, "model.dim=16,32"],
            sweep_root,
            env_extra=_env(tmp_path),
        )
    )
    trees = list((sweep_root / "multirun").glob("*/*"))
    assert len(trees) == 1, f"one sweep tree expected, found {trees}"
    summaries = _summaries(trees[0])
    assert len(summaries) == 2 and all(s["world_size"] == 2 for s in summaries)
    for summary in summaries:
        # Exact metrics under a padding DistributedSampler: each test row counted once.
        assert summary["metrics"]["test/overall/count"] == summary["data"]["test_rows"]
        assert (Path(summary["output_dir"]) / "train_ddp_process_1.log").exists()


def test_real_movielens_smoke(tmp_path):
    real_data_dir("ml-1m")
    result = _ok(
        run_nestrec(
            ["recipe=sasrec_ml1m", "debug=smoke", "trainer.enable_progress_bar=false", "logger=none"],
            tmp_path,
        )
    )
    [summary] = _summaries(tmp_path / "outputs")
    assert summary["data"]["dataset"] == "ml-1m" and summary["data"]["users"] == 400
    assert "test: HR@10=" in result.stdout


def test_real_movielens_dlrm_smoke_under_nestpipe(tmp_path):
    real_data_dir("ml-1m")
    args = [
        "recipe=dlrm_ml1m",
        "debug=smoke",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "trainer.devices=2",
    ]
    result = _ok(run_nestrec(args, tmp_path))
    [summary] = _summaries(tmp_path / "outputs")
    assert summary["data"]["dataset"] == "ml-1m" and summary["world_size"] == 2
    assert 0.0 <= summary["metrics"]["test/auc"] <= 1.0 and "test: AUC=" in result.stdout


def test_callbacks_and_trainer_flags_from_the_command_line_reach_the_trainer(tmp_path):
    """+callbacks.X, +trainer.callbacks=[...], trainer.accumulate_grad_batches, trainer.profiler:
    nothing the user adds is dropped, and the run's own checkpoints stay."""
    group_probe, trainer_probe = tmp_path / "group.json", tmp_path / "trainer.json"
    result = run_nestrec(
        ["recipe=sasrec_ml1m", *FIXTURE, "logger=csv", "trainer.accumulate_grad_batches=2", "trainer.profiler=simple",
         "+callbacks.lr_monitor._target_=lightning.pytorch.callbacks.LearningRateMonitor",
         "+callbacks.probe._target_=probe_callback.TrainerProbe", f"+callbacks.probe.out={group_probe}",
         f"+trainer.callbacks=[{{_target_: probe_callback.TrainerProbe, out: '{trainer_probe}', tag: extra}}]"],
        tmp_path, env_extra={"PYTHONPATH": str(Path(__file__).parent)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seen = json.loads(group_probe.read_text())
    assert seen["accumulate_grad_batches"] == 2 and seen["profiler"] == "SimpleProfiler"
    assert {"LearningRateMonitor", "TrainerProbe", "ModelCheckpoint"} <= set(seen["callbacks"])
    assert seen["callbacks"].count("TrainerProbe") == 2  # the group's and the trainer's
    assert json.loads(trainer_probe.read_text())["tag"] == "extra"
    summary = json.loads(next((tmp_path / "outputs").rglob("summary.json")).read_text())
    assert summary["best_checkpoint"] and Path(summary["best_checkpoint"]).exists()
