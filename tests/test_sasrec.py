"""SASRec: causal (no peeking at later items), learns the fixture's structure, evaluates per scenario."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from nestrec.baselines.sasrec import SASRec, SASRecModule
from nestrec.data.datamodule import SequenceDataModule


def test_outputs_do_not_depend_on_later_items():
    torch.manual_seed(0)
    model = SASRec(num_items=50, max_len=12, dim=16, blocks=2, heads=2).eval()
    seq = torch.tensor([[0, 0, 0, 4, 9, 17, 3, 22, 8, 1, 30, 5]])
    changed = seq.clone()
    changed[0, 8:] = torch.tensor([40, 41, 42, 43])
    a, b = model(seq), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_padding_rows_do_not_produce_nan():
    model = SASRec(num_items=10, max_len=6, dim=8, blocks=1, heads=1)
    out = model(torch.tensor([[0, 0, 0, 0, 0, 3], [0, 0, 0, 0, 0, 0]]))
    assert torch.isfinite(out).all()


def _datamodule(tmp_path, scenarios=("homepage",)):
    from nestrec.data.fixture import write_fixture

    path = write_fixture(tmp_path / "data", "recbole")
    dm = SequenceDataModule(
        dataset="fixture",
        path=str(path),
        max_len=20,
        batch_size=32,
        scenarios=scenarios,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.prepare_data()
    dm.setup()
    return dm


def test_training_beats_popularity_free_random(tmp_path):
    pl.seed_everything(0)
    dm = _datamodule(tmp_path, scenarios=("homepage", "channel", "related", "search"))
    model = SASRecModule(**dm.model_kwargs(), dim=32, heads=2, lr=3e-3, ks=(10,))
    trainer = pl.Trainer(max_epochs=25, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, check_val_every_n_epoch=25)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    result = trainer.test(model, datamodule=dm, verbose=False)[0]
    # The fixture is a noisy walk (next = previous + 1..3 most of the time): random ranking gives
    # HR@10 = 10/80; a model that learned the walk is far above that.
    assert result["test/hr@10"] > 0.35
    assert {
        "test/homepage/hr@10",
        "test/channel/hr@10",
        "test/related/hr@10",
        "test/search/hr@10",
    } <= result.keys()
    # A channel ranks among that genre's items only, so it cannot be harder than the full catalogue.
    assert result["test/channel/hr@10"] >= result["test/homepage/hr@10"]


def test_exclude_history_masks_seen_items(tmp_path):
    dm = _datamodule(tmp_path)
    model = SASRecModule(**dm.model_kwargs(), dim=16, exclude_history=True)
    batch = next(iter(dm.test_dataloader()))
    mask = model.candidate_mask(batch)
    rows = torch.arange(len(batch["target"]))
    assert mask[rows, batch["target"]].all()
    seen = batch["history"][0][batch["history"][0] > 0]
    assert not (set(seen.tolist()) - {int(batch["target"][0])}) & set(
        torch.nonzero(mask[0]).flatten().tolist()
    )


def test_lr_factor_warms_up_then_decays_to_zero():
    from nestrec.schedules import lr_factor

    cosine = lr_factor("cosine", warmup_steps=4, total_steps=14)
    assert [cosine(t) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    decay = [cosine(t) for t in range(4, 15)]
    assert decay[0] == 1.0 and abs(decay[5] - 0.5) < 1e-9 and decay[-1] == 0.0
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert lr_factor("constant", 0, None)(10_000) == 1.0


def test_cosine_schedule_drives_the_optimizer_lr(tmp_path):
    dm = _datamodule(tmp_path)
    model = SASRecModule(**dm.model_kwargs(), dim=16, lr=1e-2, lr_schedule="cosine", warmup_steps=2)
    seen: list[float] = []

    class RecordLr(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, callbacks=[RecordLr()])  # fmt: skip
    trainer.fit(model, datamodule=dm)
    steps = trainer.estimated_stepping_batches
    assert len(seen) == steps >= 4
    assert seen[0] == 5e-3 and seen[1] == 1e-2  # warm-up: 1/2, then 2/2 of the base lr
    # Cosine from the end of warm-up: full lr once more, then strictly decaying.
    assert seen[2] == 1e-2 and all(a > b for a, b in zip(seen[2:], seen[3:]))
    assert seen[-1] < 1e-2 * 0.5


def test_schedule_config_errors_name_the_problem():
    import pytest

    from nestrec.errors import ConfigError

    with pytest.raises(ConfigError, match="lr_schedule 'linear'"):
        SASRecModule(num_items=10, max_len=5, dim=8, lr_schedule="linear")
    from nestrec.schedules import lr_factor

    with pytest.raises(ConfigError, match="finite trainer.max_epochs"):
        lr_factor("cosine", 0, float("inf"))


def test_cosine_similarity_bounds_scores_and_still_learns(tmp_path):
    pl.seed_everything(0)
    dm = _datamodule(tmp_path)
    model = SASRecModule(**dm.model_kwargs(), dim=32, lr=3e-3, ks=(10,), similarity="cosine", temperature=0.1)
    batch = next(iter(dm.test_dataloader()))
    scores = model.score_items(batch)
    assert scores.abs().max() <= 1 / 0.1 + 1e-4  # |cos| <= 1, over the temperature
    trainer = pl.Trainer(max_epochs=25, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, check_val_every_n_epoch=25)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert trainer.test(model, datamodule=dm, verbose=False)[0]["test/hr@10"] > 0.35  # random: 10/80
    import pytest

    from nestrec.errors import ConfigError

    with pytest.raises(ConfigError, match="similarity 'l2'"):
        SASRecModule(num_items=10, max_len=5, dim=8, similarity="l2")
