"""Dense teacher forcing: every training target once per epoch, no slot ever reads a later item,
the last slot is exactly what serving computes, and instructions without a trigger know the user."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nestrec.errors import ConfigError
from nestrec.oxygen.data import OxygenDataModule
from nestrec.oxygen.module import OxygenPretrainModule
from nestrec.oxygen.sid import SIDRegistry

WINDOW, POOL = 6, 4


@pytest.fixture(scope="module")
def dense_data(tmp_path_factory) -> OxygenDataModule:
    # A short window, so most fixture users are cut into several rows.
    dm = OxygenDataModule(dataset="fixture", text_encoder="hashed", sid_codebook=8, window_len=WINDOW,
                          long_len=POOL, cache_dir=str(tmp_path_factory.mktemp("cache")))  # fmt: skip
    dm.prepare_data()
    dm.setup()
    return dm


def test_every_training_target_is_in_exactly_one_row_after_its_own_history(dense_data):
    rows = dense_data._tensors["train"]
    sequences = dict(zip(dense_data.split.train_users.tolist(), dense_data.split.train_sequences))
    row_users = rows["user"].numpy()
    multi_row_users = 0
    for user, seq in sequences.items():
        end = len(seq)  # rows cut a sequence from its end: each row's targets end where the next's begin
        mine = np.flatnonzero(row_users == user)
        multi_row_users += len(mine) > 1
        for r in mine:
            targets = rows["targets"][r].numpy()
            valid = np.flatnonzero(targets)
            assert (valid == np.arange(WINDOW - len(valid), WINDOW)).all()  # right-aligned, no holes
            start = end - len(valid)
            np.testing.assert_array_equal(targets[valid], seq[start:end])
            # The history is the behaviour before the last target: the window's inputs + IGR's pool.
            history = rows["history"][r].numpy()
            np.testing.assert_array_equal(history[history > 0], seq[max(0, start - 1 - POOL) : end - 1])
            window = history[-WINDOW:]
            np.testing.assert_array_equal(window[valid], seq[start - 1 : end - 1])  # slot j, then target j
            related = valid[rows["trigger_item"][r].numpy()[valid] > 0]
            np.testing.assert_array_equal(rows["trigger_item"][r].numpy()[related], window[related])
            end = start
        assert end == 1, user  # every target of the sequence (positions 1..n-1) once, none twice
    assert multi_row_users > 10
    assert dense_data.describe()["train_targets"] == sum(len(s) - 1 for s in sequences.values())


def _registry(items: int = 24) -> SIDRegistry:
    vectors = torch.randn(items, 8, generator=torch.Generator().manual_seed(0))
    return SIDRegistry.build(vectors, levels=2, codebook_size=4, policy="disambiguate")[0]


def _module(registry: SIDRegistry, **kwargs) -> OxygenPretrainModule:
    settings = dict(
        num_items=registry.num_items, registry_state=registry.state(), text_dim=8, num_genres=2,
        profile_sizes=[], long_len=POOL, encoder_window=WINDOW, d_model=32, ffn=64, dropout=0.0, igr_k=2,
        beam={s: 5 for s in ("homepage", "channel", "related", "search")}, ks=(1, 5),
    )  # fmt: skip
    torch.manual_seed(0)
    return OxygenPretrainModule(**{**settings, **kwargs}).eval()


def _dense_batch(n: int, items: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(1, items + 1, (n, POOL + WINDOW), generator=g)
    targets = torch.cat([history[:, POOL + 1 :], torch.randint(1, items + 1, (n, 1), generator=g)], 1)
    scenario = torch.randint(0, 4, (n, WINDOW), generator=g)
    return {
        "history": history,
        "targets": targets,
        "scenario": scenario,
        "trigger_item": torch.where(scenario == 2, history[:, POOL:], 0),
        "trigger_genre": torch.where(scenario == 1, torch.randint(0, 2, (n, WINDOW), generator=g), -1),
        "reasoning": torch.where((scenario == 3).unsqueeze(-1), torch.randn(n, WINDOW, 8, generator=g), 0.0),
    }


def _slot_logits(module: OxygenPretrainModule, batch) -> torch.Tensor:
    encoded, target, rows, slots = module.dense_pairs(batch)
    logits = module.model.sid_logits(encoded, module.model.sid_codes[target])
    return torch.cat(logits, 1).view(len(batch["history"]), WINDOW, -1)


@pytest.mark.parametrize("cut,reads_state", [(0, False), (2, False), (4, False), (2, True)])
def test_no_slot_reads_a_later_item_or_a_later_slots_instruction(cut, reads_state):
    registry = _registry()
    module = _module(registry, decoder_reads_state=reads_state)
    batch = _dense_batch(5, registry.num_items)
    before = _slot_logits(module, batch)
    later = {k: v.clone() for k, v in batch.items()}
    g = torch.Generator().manual_seed(7)
    # Everything from slot cut+1 on: the items, their targets, scenarios, triggers, queries.
    later["history"][:, POOL + cut + 1 :] = torch.randint(
        1, registry.num_items + 1, (5, WINDOW - cut - 1), generator=g
    )
    later["targets"][:, cut + 1 :] = torch.randint(
        1, registry.num_items + 1, (5, WINDOW - cut - 1), generator=g
    )
    later["scenario"][:, cut + 1 :] = (later["scenario"][:, cut + 1 :] + 1) % 4
    later["reasoning"][:, cut + 1 :] = torch.randn(5, WINDOW - cut - 1, 8, generator=g)
    after = _slot_logits(module, later)
    torch.testing.assert_close(after[:, : cut + 1], before[:, : cut + 1], rtol=0, atol=1e-5)
    assert not torch.allclose(after[:, cut + 1 :], before[:, cut + 1 :], atol=1e-3)
    # Negative control: the item *at* slot cut is visible to slot cut.
    control = {k: v.clone() for k, v in batch.items()}
    control["history"][:, POOL + cut] = control["history"][:, POOL + cut] % registry.num_items + 1
    assert not torch.allclose(_slot_logits(module, control)[:, cut], before[:, cut], atol=1e-3)


@pytest.mark.parametrize("reads_state", [False, True])
def test_the_last_slot_is_what_serving_computes(reads_state):
    registry = _registry()
    module = _module(registry, decoder_reads_state=reads_state)
    batch = _dense_batch(5, registry.num_items, seed=3)
    dense = _slot_logits(module, batch)[:, -1]
    single = {k: v[:, -1] for k, v in batch.items() if k not in ("history", "targets")}
    single.update(history=batch["history"], target=batch["targets"][:, -1])
    encoded = module.model.encode(single)
    one = torch.cat(module.model.sid_logits(encoded, module.model.sid_codes[single["target"]]), 1)
    torch.testing.assert_close(one, dense, rtol=0, atol=1e-5)


def test_rows_sharing_a_history_are_encoded_once_and_decode_as_on_their_own():
    """Evaluation batches hold one row per scenario of a user: the encoder runs per distinct
    history, and every row's memory and SID logits equal encoding that row alone."""
    registry = _registry()
    module = _module(registry)
    batch = _dense_batch(3, registry.num_items, seed=4)
    rows = {k: v[:, -1] for k, v in batch.items() if k not in ("history", "targets")}
    rows.update(history=batch["history"], target=batch["targets"][:, -1])
    repeat = torch.tensor([0, 0, 1, 2, 2, 2])  # users 0 and 2 under several scenarios
    grouped = {k: v[repeat] for k, v in rows.items()}
    grouped["scenario"] = torch.tensor([0, 3, 0, 0, 1, 2])
    grouped["trigger_genre"] = torch.where(grouped["scenario"] == 1, 1, -1)
    grouped["trigger_item"] = torch.where(grouped["scenario"] == 2, grouped["history"][:, -1], 0)
    calls = []
    original = module.model.encode_window
    module.model.encode_window = lambda b: calls.append(len(b["history"])) or original(b)
    together = module.model.encode(grouped)
    assert calls == [3]
    sid = module.model.sid_codes[grouped["target"]]
    joint = torch.cat(module.model.sid_logits(together, sid), 1)
    for r in range(len(repeat)):
        alone = module.model.encode({k: v[r : r + 1] for k, v in grouped.items()})
        torch.testing.assert_close(together["memory"][r : r + 1], alone["memory"], rtol=0, atol=1e-6)
        one = torch.cat(module.model.sid_logits(alone, sid[r : r + 1]), 1)
        torch.testing.assert_close(joint[r : r + 1], one, rtol=0, atol=1e-5)


def test_homepage_instructions_depend_on_the_user_unless_switched_off():
    from nestrec.data.scenarios import SCENARIO_KINDS
    from nestrec.oxygen.model import SCENARIO_HOMEPAGE

    assert SCENARIO_KINDS[SCENARIO_HOMEPAGE] == "homepage"
    registry = _registry()
    batch = _dense_batch(4, registry.num_items, seed=5)
    single = {"history": batch["history"], "target": batch["targets"][:, -1],
              "scenario": torch.zeros(4, dtype=torch.long), "trigger_item": torch.zeros(4, dtype=torch.long),
              "trigger_genre": torch.full((4,), -1), "reasoning": torch.zeros(4, 8)}  # fmt: skip
    aware = _module(registry).model.encode(single)
    assert torch.cdist(aware["instr"], aware["instr"]).triu(1).max() > 1e-3
    assert torch.cdist(aware["q"], aware["q"]).triu(1).max() > 1e-3
    fixed = _module(registry, user_trigger_items=0).model.encode(single)
    torch.testing.assert_close(fixed["instr"], fixed["instr"][:1].expand_as(fixed["instr"]))


def test_one_target_rows_remain_a_switch_and_dense_rows_need_the_causal_encoder(tmp_path):
    dm = OxygenDataModule(dataset="fixture", text_encoder="hashed", sid_codebook=8, teacher_forcing="single",
                          samples_per_user=3, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    dm.prepare_data()
    dm.setup()
    assert dm.model_kwargs()["encoder_window"] == 0 and "target" in dm._tensors["train"]
    assert dm._tensors["train"] is dm._tensors["train_pairs"]
    module = _module(_registry(), encoder_window=0, recent_len=4)
    with pytest.raises(ConfigError, match="dense training rows need the causal encoder"):
        module.losses(_dense_batch(2, 24))
    with pytest.raises(ConfigError, match="unknown teacher_forcing 'sparse'"):
        OxygenDataModule(dataset="fixture", teacher_forcing="sparse")


def test_sid_distillation_targets_are_the_item_softmax_marginals_under_the_true_prefix():
    """The soft target of level l is P(code_l = c | target's first l codes) under the item softmax:
    checked against a brute-force sum over items; an item softmax that puts all mass on the target
    gives back the one-hot loss (the control: any other mass spreads the target)."""
    registry = _registry(24)
    module = _module(registry, item_loss=1.0, sid_distill=0.5)
    codes = module.model.sid_codes  # [items + 1, depth], row 0 = padding
    n, items = 7, registry.num_items
    g = torch.Generator().manual_seed(3)
    item_logits = torch.randn(n, items, generator=g)
    target = torch.randint(1, items + 1, (n,), generator=g)
    sid = codes[target]
    level_logits = [torch.randn(n, v, generator=g) for v in registry.vocab_sizes]
    allowed = torch.rand(n, items + 1, generator=g) < 0.6  # e.g. a channel's genre
    allowed[torch.arange(n), target] = True
    rows = torch.tensor([1, 4, 5])  # e.g. channel rows, each over its genre's items
    for restrict in (None, (rows, allowed[rows])):
        got = module._distillation_ce(item_logits.log_softmax(-1), sid, level_logits, restrict)
        p = item_logits.softmax(-1)
        if restrict is not None:
            p[rows] = p[rows] * allowed[rows, 1:]
        expected = torch.zeros(n)
        for row in range(n):
            for level, logits in enumerate(level_logits):
                under = (codes[1:, :level] == sid[row, :level]).all(1)
                q = torch.zeros(logits.shape[1])
                q.index_add_(0, codes[1:][under, level], p[row][under])
                q = q / q.sum()
                expected[row] += -(q * logits[row].log_softmax(-1)).sum() / len(level_logits)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    unrestricted = module._distillation_ce(item_logits.log_softmax(-1), sid, level_logits)
    assert not torch.allclose(unrestricted[rows], got[rows])  # the restriction changes the targets
    torch.testing.assert_close(unrestricted[[0, 2, 3, 6]], got[[0, 2, 3, 6]])  # and only there
    one_hot = torch.full((n, items), -1e4).scatter(1, (target - 1).unsqueeze(1), 1e4)
    hard = torch.stack(
        [
            torch.nn.functional.cross_entropy(lg, sid[:, i], reduction="none")
            for i, lg in enumerate(level_logits)
        ]
    ).mean(0)
    torch.testing.assert_close(module._distillation_ce(one_hot.log_softmax(-1), sid, level_logits), hard)
    # Every item under the target's level-1 code far below the rest (their softmax underflows):
    # the deeper levels fall back to the one-hot loss instead of contributing nothing.
    first = codes[1:, 0] == sid[0, 0]
    lost = torch.where(first, -1e4, 0.0).expand(1, -1)
    level0 = torch.zeros(level_logits[0].shape[1]).index_add_(0, codes[1:, 0], (~first).float())
    level0 = -(level0 / level0.sum() * level_logits[0][0].log_softmax(-1)).sum()
    deeper = [torch.nn.functional.cross_entropy(lg[:1], sid[:1, i]) for i, lg in enumerate(level_logits) if i]
    got = module._distillation_ce(lost.log_softmax(-1), sid[:1], [lg[:1] for lg in level_logits])
    torch.testing.assert_close(got, ((level0 + sum(deeper)) / len(level_logits)).view(1))
    assert not torch.allclose(got, hard)
    with pytest.raises(ConfigError, match="sid_distill needs the item head"):
        _module(registry, sid_distill=0.5)
    with pytest.raises(ConfigError, match=r"sid_distill is a mixing weight in \[0, 1\]"):
        _module(registry, item_loss=1.0, sid_distill=1.5)


def test_distillation_mixes_into_the_sid_loss_with_its_weight_except_on_search_rows():
    """loss = (1 - β)·hard + β·soft + item_loss·item_ce + q2i_weight·q2i on homepage rows; `ntp`
    stays the one-hot loss (comparable across runs); search rows (the item head cannot read the
    query) keep the one-hot loss whatever β is."""
    registry = _registry(24)

    def losses(beta: float, scenario: int) -> tuple[OxygenPretrainModule, dict[str, torch.Tensor]]:
        batch = _dense_batch(3, registry.num_items)
        batch["scenario"] = torch.full_like(batch["scenario"], scenario)
        batch["trigger_item"] = torch.zeros_like(batch["trigger_item"])
        batch["trigger_genre"] = torch.full_like(batch["trigger_genre"], -1)
        module = _module(registry, item_loss=0.5, sid_distill=beta).train()
        torch.manual_seed(1)
        return module, module.losses(batch)

    for beta in (0.25, 1.0):
        module, out = losses(beta, scenario=0)
        mixed = (1 - beta) * out["ntp"] + beta * out["sid_distill"]
        torch.testing.assert_close(out["loss"], mixed + 0.5 * out["item_ce"] + 0.2 * out["q2i"])
        assert not torch.allclose(out["sid_distill"], out["ntp"])
        module.zero_grad()
        out["sid_distill"].backward()
        assert module.model.heads[-1].weight.grad.abs().sum() > 0
    search = 3
    torch.testing.assert_close(losses(1.0, search)[1]["loss"], losses(0.0, search)[1]["loss"])


def test_the_shared_memory_decoder_gives_the_reference_logits_with_a_state_reading_decoder():
    """Validation, test and serving decode with SharedMemoryDecoder; with the slot state in the
    decoder's start its logits must still be those of next_logits on memory indexed per beam."""
    from nestrec.oxygen.shared_memory_decoder import SharedMemoryDecoder

    registry = _registry()
    module = _module(registry, decoder_reads_state=True)
    batch = _dense_batch(4, registry.num_items, seed=5)
    rows = {k: v[:, -1] for k, v in batch.items() if k not in ("history", "targets")}
    rows.update(history=batch["history"], target=batch["targets"][:, -1])
    with torch.no_grad():
        encoded = module.model.encode(rows)
        decoder = SharedMemoryDecoder(module.model)
        assert decoder.supported
        prepared = decoder.prepare(encoded)
        beams = torch.arange(4).repeat_interleave(3)
        prefix = torch.randint(0, 4, (12, 1), generator=torch.Generator().manual_seed(0))
        reference = module.model.next_logits({k: v[beams] for k, v in encoded.items()}, prefix)
        torch.testing.assert_close(decoder.next_logits(prepared, beams, prefix), reference, rtol=0, atol=1e-5)
        without = dict(encoded, slot_state=torch.zeros_like(encoded["slot_state"]))
        assert not torch.allclose(
            module.model.next_logits({k: v[beams] for k, v in without.items()}, prefix), reference
        )
    with pytest.raises(ConfigError, match="decoder_reads_state needs the causal encoder"):
        _module(registry, decoder_reads_state=True, encoder_window=0)
