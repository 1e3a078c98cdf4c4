"""OxygenREC end to end: a tiny model memorises a tiny dataset; edge cases; the recipe runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_nestrec
from nestrec.errors import ConfigError, UserInputError
from nestrec.oxygen.module import OxygenPretrainModule
from nestrec.oxygen.sid import SIDRegistry


def _registry(items: int = 24, seed: int = 0) -> SIDRegistry:
    vectors = torch.randn(items, 8, generator=torch.Generator().manual_seed(seed))
    return SIDRegistry.build(vectors, levels=2, codebook_size=4, policy="disambiguate")[0]


def _module(registry: SIDRegistry, **kwargs) -> OxygenPretrainModule:
    settings = dict(
        num_items=registry.num_items, registry_state=registry.state(), text_dim=8, num_genres=2, profile_sizes=[],
        recent_len=4, long_len=6, d_model=32, ffn=64, dropout=0.0, igr_k=2,
        beam={s: 5 for s in ("homepage", "channel", "related", "search")}, ks=(1, 5), lr=5e-3,
    )  # fmt: skip
    return OxygenPretrainModule(**{**settings, **kwargs})


def _batch(n: int, items: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "history": torch.randint(1, items + 1, (n, 10), generator=g),
        "target": torch.randint(1, items + 1, (n,), generator=g),
        "scenario": torch.randint(0, 4, (n,), generator=g),
        "trigger_item": torch.zeros(n, dtype=torch.long),
        "trigger_genre": torch.full((n,), -1, dtype=torch.long),
        "reasoning": torch.zeros(n, 8),
        "index": torch.arange(n),
    }


def test_tiny_model_memorises_a_tiny_dataset():
    torch.manual_seed(0)
    registry = _registry()
    module = _module(registry)
    batch = _batch(16, registry.num_items)
    optimizer = module.configure_optimizers()
    for _ in range(300):
        optimizer.zero_grad()
        module.losses(batch)["loss"].backward()
        optimizer.step()
    module.eval()
    items, _ = module.recommend(batch, beam=5, max_items=5)
    hr1 = (items[:, 0] == batch["target"]).float().mean().item()
    assert hr1 == 1.0, (items[:, 0], batch["target"])


def test_edge_cases_and_bad_input():
    registry = _registry()
    module = _module(registry).eval()
    batch = _batch(4, registry.num_items)
    batch["history"][0] = 0  # an empty history: the profile token alone still conditions the decoder
    items, _ = module.recommend(batch, beam=5, max_items=5)
    assert ((items >= 1) & (items <= registry.num_items)).all()
    bad = dict(batch, history=batch["history"].clone())
    bad["history"][1, 3] = registry.num_items + 7
    with pytest.raises(UserInputError, match="history holds item id 31, outside the catalogue 1..24"):
        module.recommend(bad, beam=5, max_items=5)
    with pytest.raises(UserInputError, match="scenario index 9 is outside"):
        module.recommend(dict(batch, scenario=torch.tensor([0, 1, 2, 9])), beam=5, max_items=5)
    with pytest.raises(ConfigError, match="beam widths for unknown scenario"):
        _module(registry, beam={"checkout": 5})
    other = _registry(seed=1)
    with pytest.raises(UserInputError, match="SID registry version mismatch"):
        module.on_load_checkpoint({"sid_registry": other.state()})
    module.on_load_checkpoint({"sid_registry": registry.state()})  # the same registry loads


def test_recipe_smoke_on_the_fixture(tmp_path):
    result = run_nestrec(
        ["recipe=oxygenrec_pretrain", "data=oxygen_fixture", "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1",
         "logger=csv", "trainer.enable_progress_bar=false"],
        tmp_path, env_extra={"NESTREC_DATA_DIR": str(tmp_path / "data")},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [path] = list((tmp_path / "outputs").rglob("summary.json"))
    summary = json.loads(path.read_text())
    for scenario in ("homepage", "channel", "related", "search"):
        assert 0.0 <= summary["metrics"][f"test/{scenario}/hr@10"] <= 1.0
    assert summary["data"]["sid"]["policy"] == "disambiguate"
    registry = SIDRegistry.load(Path(summary["output_dir"]) / "sid_registry.json")
    assert registry.version == summary["data"]["sid"]["version"]


def test_sharded_item_table_under_nestpipe_on_two_processes(tmp_path):
    """The item-ID table swaps to a row-sharded one by config; strategy=nestpipe trains it."""
    result = run_nestrec(
        ["recipe=oxygenrec_pretrain", "data=oxygen_fixture", "model.embedding=sharded", "strategy=nestpipe",
         "trainer.devices=2", "+strategy.find_unused_parameters=true", "trainer.max_epochs=1",
         "trainer.check_val_every_n_epoch=1", "logger=csv",
         "trainer.enable_progress_bar=false"],
        tmp_path, env_extra={"NESTREC_DATA_DIR": str(tmp_path / "data")},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [path] = list((tmp_path / "outputs").rglob("summary.json"))
    summary = json.loads(path.read_text())
    assert summary["world_size"] == 2 and 0.0 <= summary["metrics"]["test/hr@10"] <= 1.0


def test_behaviour_weights_follow_ratings_and_weight_the_loss(tmp_path):
    from nestrec.oxygen.data import OxygenDataModule

    dm = OxygenDataModule(dataset="fixture", text_encoder="hashed", behaviour_weights={5: 3.0},
                          scenarios=["homepage"], cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm.prepare_data()
    dm.setup()
    tensors = dm._tensors["train_pairs"]
    ratings = dm._user_ratings()
    seqs = dict(zip(dm.split.train_users.tolist(), dm.split.train_sequences))
    checked = 0
    for user, target, weight in zip(
        tensors["user"].tolist(), tensors["target"].tolist(), tensors["weight"].tolist()
    ):
        items, r = ratings[user]
        positions = [t for t in range(1, len(seqs[user])) if seqs[user][t] == target]
        assert weight == (3.0 if r[positions[-1]] == 5 else 1.0) or len(positions) > 1
        checked += 1
    assert checked > 100 and 3.0 in tensors["weight"].tolist() and 1.0 in tensors["weight"].tolist()
    dense = dm._tensors["train"]  # dense rows weight every target the same way
    for r in range(0, len(dense["user"]), 7):
        items, r_of = ratings[int(dense["user"][r])]
        valid = dense["targets"][r] > 0
        if not np.array_equal(items[: len(seqs[int(dense["user"][r])])], seqs[int(dense["user"][r])]):
            continue
        position = {int(i): k for k, i in enumerate(items)}
        for target, weight in zip(dense["targets"][r][valid].tolist(), dense["weight"][r][valid].tolist()):
            assert weight == (3.0 if r_of[position[target]] == 5 else 1.0) or list(items).count(target) > 1
    registry = _registry()
    module = _module(registry)
    batch = _batch(6, registry.num_items)
    uniform = module.losses(batch)["ntp"]
    assert torch.allclose(module.losses(dict(batch, weight=torch.ones(6)))["ntp"], uniform)
    heavy = torch.tensor([100.0, 1, 1, 1, 1, 1])
    single = module.losses({k: v[:1] for k, v in batch.items()})["ntp"]
    weighted = module.losses(dict(batch, weight=heavy))["ntp"]
    assert abs(weighted - single) < abs(uniform - single)
