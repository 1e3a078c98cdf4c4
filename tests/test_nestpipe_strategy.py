"""The ``nestpipe`` strategy inside Lightning: hooks and Trainer features keep working, 1 and 2
processes give the same loss curve, resume is bit-identical, bad input fails in one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from conftest import run_nestrec
from nestrec.baselines.dlrm import DLRMModule
from nestrec.data.ctr import CTRDataModule
from nestrec.data.fixture import write_fixture
from nestrec.errors import ConfigError, UserInputError
from nestrec.sparse import JaggedFeatures
from nestrec.strategy import NestPipeStrategy

DLRM = [
    "recipe=dlrm_ml1m",
    "data=ctr_fixture",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]


def _env(tmp_path: Path) -> dict:
    return {"NESTREC_DATA_DIR": str(tmp_path.parent / "shared-data")}


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _summary(root: Path) -> dict:
    [path] = list(root.rglob("summary.json"))
    return json.loads(path.read_text())


class HookRecorder(pl.Callback):
    def __init__(self):
        self.calls: list[str] = []

    def __getattribute__(self, name):
        if name.startswith("on_") and name in pl.Callback.__dict__:
            calls = object.__getattribute__(self, "calls")
            return lambda *args, **kwargs: calls.append(name)
        return object.__getattribute__(self, name)


def test_lightning_hooks_and_trainer_features(tmp_path):
    data_dir = write_fixture(tmp_path / "data", "recbole")
    dm = CTRDataModule(
        path=str(data_dir), batch_size=32, eval_batch_size=128, cache_dir=str(tmp_path / "cache")
    )
    dm.setup()
    pl.seed_everything(0)
    model = DLRMModule(**dm.model_kwargs(), dim=8, gradient_clip_val=0.5)
    before = model.model.embeddings.stores["item"].weight.clone()
    recorder = HookRecorder()
    trainer = pl.Trainer(
        strategy=NestPipeStrategy(), accelerator="cpu", devices=1, max_steps=7, val_check_interval=5,
        callbacks=[recorder, pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)],
        logger=pl.loggers.CSVLogger(tmp_path), enable_progress_bar=True, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    [tested] = trainer.test(model, datamodule=dm, verbose=False)
    predictions = trainer.predict(model, dataloaders=dm.test_dataloader())
    assert trainer.global_step == 7
    for hook in ("on_fit_start", "on_train_batch_end", "on_before_optimizer_step", "on_validation_epoch_end",
                 "on_save_checkpoint", "on_test_epoch_end", "on_predict_batch_end", "on_fit_end"):  # fmt: skip
        assert hook in recorder.calls, hook
    assert recorder.calls.count("on_train_batch_end") == 7
    assert not torch.equal(before, model.model.embeddings.stores["item"].weight)  # tables trained
    assert (tmp_path / "ck" / "last.ckpt" / "manifest.json").exists()
    assert 0.0 <= tested["test/auc"] <= 1.0 and len(predictions) > 0
    torch.distributed.destroy_process_group()


def test_bad_ids_and_unknown_pipeline():
    from nestrec.sharding import ShardedEmbeddingCollection
    from sharded_reference import TABLES

    tables = ShardedEmbeddingCollection(TABLES)
    ok = {"user": torch.tensor([0]), "item": torch.tensor([1]), "history": torch.tensor([2])}
    tables(JaggedFeatures.from_dense(ok))
    with pytest.raises(UserInputError, match=r"feature 'item': id 29 is outside table 'item' rows \[0, 29\)"):
        tables(JaggedFeatures.from_dense({**ok, "item": torch.tensor([29])}))
    with pytest.raises(UserInputError, match="feature 'user': id -1 is outside"):
        tables(JaggedFeatures.from_dense({**ok, "user": torch.tensor([-1])}))
    with pytest.raises(ConfigError, match="unknown NestPipe pipeline 'dpb'"):
        NestPipeStrategy(pipeline="dpb")
    with pytest.raises(ConfigError, match="retrieval_depth=3 is not supported"):
        NestPipeStrategy(pipeline="nested", retrieval_depth=3)


def test_one_and_two_processes_give_the_same_loss_curve(tmp_path):
    curves = {}
    for devices in (1, 2):
        work = tmp_path / f"d{devices}"
        work.mkdir()
        _ok(
            run_nestrec(
                [*DLRM, "logger=csv", "trainer.max_epochs=2", f"trainer.devices={devices}"],
                work,
                env_extra=_env(tmp_path),
            )
        )
        summary = _summary(work / "outputs")
        assert summary["world_size"] == devices
        [metrics] = list(Path(summary["output_dir"]).rglob("metrics.csv"))
        curves[devices] = [
            float(r["train/loss"]) for r in csv.DictReader(metrics.open()) if r.get("train/loss")
        ]
    assert len(curves[1]) == len(curves[2]) >= 10
    assert max(abs(a - b) for a, b in zip(curves[1], curves[2])) < 1e-4, (curves[1][:5], curves[2][:5])
    assert len({round(v, 6) for v in curves[1]}) > 5  # the model really trained (the curve moves)


def test_resume_is_bit_identical_and_reshards(tmp_path):
    straight, resumed, wider = (tmp_path / n for n in ("straight", "resumed", "wider"))
    for d in (straight, resumed, wider):
        d.mkdir()
    common = [*DLRM, "logger=none", "trainer.devices=2", "data.batch_size=48", "run.test=false"]
    # The uninterrupted run also keeps its end-of-epoch-1 state: the resume starts from exactly the
    # checkpoint a 1-epoch job would have left (one subprocess run fewer than running that job).
    every_epoch = [
        "~callbacks.last_checkpoint",  # one monitor-less ModelCheckpoint per Trainer
        "+callbacks.every_epoch._target_=lightning.pytorch.callbacks.ModelCheckpoint",
        "+callbacks.every_epoch.filename='epoch{epoch}'",
        "+callbacks.every_epoch.auto_insert_metric_name=false",
        "+callbacks.every_epoch.save_top_k=-1",
    ]
    _ok(run_nestrec([*common, *every_epoch, "trainer.max_epochs=2"], straight, env_extra=_env(tmp_path)))
    last = Path(_summary(straight / "outputs")["output_dir"]) / "checkpoints" / "epoch0.ckpt"
    _ok(
        run_nestrec(
            [*common, "trainer.max_epochs=2", f"run.ckpt_path={last}"], resumed, env_extra=_env(tmp_path)
        )
    )

    a = Path(_summary(straight / "outputs")["output_dir"]) / "checkpoints" / "epoch1.ckpt"
    b = Path(_summary(resumed / "outputs")["output_dir"]) / "checkpoints" / "last.ckpt"
    meta_a, meta_b = (
        torch.load(a / "meta.pt", weights_only=False),
        torch.load(b / "meta.pt", weights_only=False),
    )
    assert meta_a["global_step"] == meta_b["global_step"] > 0
    for key, value in meta_a["state_dict"].items():
        assert torch.equal(value, meta_b["state_dict"][key]), key
    for shard in sorted(a.glob("shard-*.pt")):
        sa, sb = torch.load(shard), torch.load(b / shard.name)
        for table, parts in sa["collection0"].items():
            for part, value in parts.items():
                assert torch.equal(value, sb["collection0"][table][part]), (shard.name, table, part)

    # A different world size loads the same checkpoint (resharded) and keeps training.
    _ok(run_nestrec([*common[:-2], "trainer.devices=3", "data.batch_size=48", "trainer.max_epochs=2", f"run.ckpt_path={last}"],
                    wider, env_extra=_env(tmp_path)))  # fmt: skip
    summary = _summary(wider / "outputs")
    assert summary["world_size"] == 3 and summary["epochs"] == 2 and "test/auc" in summary["metrics"]


def test_bad_run_inputs_are_one_line_errors(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    cases = {
        "budget": ["strategy.host_memory_budget_gb=0.000001"],
        "checkpoint": [f"run.ckpt_path={tmp_path / 'missing.ckpt'}"],
        "world": ["data.batch_size=63", "trainer.devices=2"],
    }

    def run(name: str):  # three user runs at once (each mostly start-up), each in its own directory
        (tmp_path / name).mkdir()
        return run_nestrec([*DLRM, "logger=none", *cases[name]], tmp_path / name, env_extra=_env(tmp_path))

    with ThreadPoolExecutor(len(cases)) as pool:
        results = dict(zip(cases, pool.map(run, cases)))
    result = results["budget"]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "over the host_memory_budget_gb=1e-06; use at least" in result.stderr
    result = results["checkpoint"]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "missing.ckpt" in result.stderr
    result = results["world"]
    assert (
        result.returncode != 0
        and "global batch size 63 is not divisible by the world size 2" in result.stderr
    )


def test_sasrec_with_sharded_item_table_under_nestpipe(tmp_path):
    common = ["recipe=sasrec_ml1m", "data=fixture", "debug=smoke", "model.embedding=sharded", "trainer.devices=2",
              "trainer.accelerator=cpu", "logger=none", "trainer.enable_progress_bar=false"]  # fmt: skip
    _ok(run_nestrec([*common, "strategy=nestpipe"], tmp_path, env_extra=_env(tmp_path)))
    summary = _summary(tmp_path / "outputs")
    assert summary["world_size"] == 2 and "test/ndcg@10" in summary["metrics"]
    assert (Path(summary["best_checkpoint"]) / "manifest.json").exists()
    # Plain DDP would silently train one unsynchronised copy per rank: refused instead.
    other = tmp_path / "ddp"
    other.mkdir()
    result = run_nestrec([*common, "strategy=ddp"], other, env_extra=_env(tmp_path))
    assert result.returncode != 0 and "use strategy=nestpipe" in result.stderr


def test_named_strategies_and_public_imports():
    """What the README shows: a schedule by name, or the Python form; the classes import from their package."""
    import lightning.pytorch as pl

    from nestrec.pipeline import PipelinedLightningModule  # noqa: F401
    from nestrec.strategy import NestPipeStrategy

    for mode in ("sync", "dbp", "fwp", "nested"):
        name = "nestpipe" if mode == "sync" else f"nestpipe_{mode}"
        trainer = pl.Trainer(
            strategy=name, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False
        )
        assert (
            isinstance(trainer.strategy, NestPipeStrategy) and trainer.strategy.pipeline_config.mode == mode
        )
    strategy = NestPipeStrategy(pipeline="nested", micro_batches=4, clustering="signature")
    assert strategy.pipeline_config.num_micro_batches == 4 and strategy.pipeline_config.prefetch
