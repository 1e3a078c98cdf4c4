"""OxygenREC building blocks: tokenizer, registry, trie, beam search, Q2I, IGR, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nestrec.errors import ConfigError, UserInputError
from nestrec.oxygen.decoding import constrained_beam_search, items_from_beams
from nestrec.oxygen.losses import q2i_loss
from nestrec.oxygen.model import OxygenModel
from nestrec.oxygen.sid import PrefixTrie, SIDRegistry, rq_kmeans


def _vectors(n: int = 300, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(12, d, generator=g) * 3
    return centers[torch.randint(0, 12, (n,), generator=g)] + torch.randn(n, d, generator=g)


def test_rq_kmeans_error_decreases_per_level():
    codes, books, errors, _ = rq_kmeans(_vectors(), levels=3, codebook_size=8)
    assert codes.shape == (300, 3) and len(books) == 3
    assert errors[0] > errors[1] > errors[2]
    assert int(codes.max()) < 8 and int(codes.min()) >= 0


def test_balanced_rq_kmeans_caps_every_code_and_the_collision_token_is_shared():
    vectors = _vectors(n=300)  # 12 tight blobs of ~25: plain k-means with 8 codes is lopsided
    plain, *_ = rq_kmeans(vectors, levels=2, codebook_size=8)
    balanced, *_ = rq_kmeans(vectors, levels=2, codebook_size=8, balanced=True)
    for level in range(2):
        assert int(torch.bincount(balanced[:, level], minlength=8).max()) <= 300 // 8 + 1  # ceil(300 / 8)
    assert int(torch.bincount(plain[:, 0], minlength=8).max()) > 300 // 8 + 1  # the cap does bind
    registry, diagnostics = SIDRegistry.build(
        vectors, levels=2, codebook_size=4, policy="disambiguate", balanced=True, collision_token="residual"
    )
    codes = registry.codes[1:]
    assert len({tuple(c) for c in codes.tolist()}) == 300  # every item has its own SID
    assert int(codes[:, -1].max()) + 1 == diagnostics["max_collision_group"]  # one shared codebook
    # The shared token means the same residual direction in every group: items carrying token t
    # are, on average, closer to each other's residual than items carrying different tokens.
    _, _, _, residual = rq_kmeans(vectors, levels=2, codebook_size=4, balanced=True)
    token = codes[:, -1]
    same = (token.unsqueeze(0) == token.unsqueeze(1)) & ~torch.eye(300, dtype=torch.bool)
    distance = torch.cdist(residual, residual)
    assert distance[same].mean() < distance[~same & ~torch.eye(300, dtype=torch.bool)].mean()
    with pytest.raises(ConfigError, match="unknown collision_token 'rank'"):
        SIDRegistry.build(vectors, policy="disambiguate", collision_token="rank")


def test_cooccurrence_vectors_put_items_watched_together_together():
    import numpy as np

    from nestrec.oxygen.item_vectors import cooccurrence_vectors, sid_vectors

    rng = np.random.default_rng(0)
    # Two audiences: items 1..10 are watched with each other, items 11..20 with each other.
    sequences = [rng.permutation(np.arange(1, 11) + 10 * (u % 2))[:8] for u in range(200)]
    vectors = torch.nn.functional.normalize(cooccurrence_vectors(sequences, 20, dim=4), dim=1)
    similarity = vectors @ vectors.t()
    within = torch.cat([similarity[:10, :10].flatten(), similarity[10:, 10:].flatten()]).mean()
    assert within > similarity[:10, 10:].mean() + 0.5
    text = torch.randn(20, 6)
    assert sid_vectors("fused", text, sequences).shape == (20, 6 + 64)
    assert sid_vectors("text", text, sequences) is text
    with pytest.raises(ConfigError, match="unknown sid_source 'audio'"):
        sid_vectors("audio", text, sequences)


@pytest.mark.parametrize("policy", ["keep", "disambiguate"])
def test_registry_round_trip_and_version_check(tmp_path, policy):
    registry, diagnostics = SIDRegistry.build(_vectors(), levels=2, codebook_size=4, policy=policy)
    assert 0 <= diagnostics["collision_rate"] < 1 and len(diagnostics["utilisation"]) == 2
    assert diagnostics["reconstruction_mse"][0] > diagnostics["reconstruction_mse"][1]
    loaded = SIDRegistry.load(registry.save(tmp_path / "r.json"))
    assert loaded.version == registry.version and torch.equal(loaded.codes, registry.codes)
    for item in (1, 150, 300):
        assert item in loaded.items_of(loaded.sid(item))
    if policy == "disambiguate":  # every item has its own SID
        assert len({loaded.sid(i) for i in range(1, 301)}) == 300
    other, _ = SIDRegistry.build(_vectors(seed=1), levels=2, codebook_size=4, policy=policy)
    with pytest.raises(UserInputError, match="SID registry version mismatch"):
        loaded.check_version(other.version)
    with pytest.raises(UserInputError, match="item 301 is not in the SID registry"):
        loaded.sid(301)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserInputError, match="malformed"):
        SIDRegistry.load(tmp_path / "bad.json")
    with pytest.raises(UserInputError, match="not found"):
        SIDRegistry.load(tmp_path / "missing.json")


def _tiny_trie() -> tuple[PrefixTrie, torch.Tensor]:
    codes = torch.tensor([[0, 1], [0, 2], [1, 0], [2, 2], [2, 0]])  # items 1..5
    return PrefixTrie.build(codes, [3, 3], torch.zeros(5, dtype=torch.long)), codes


def test_trie_holds_exactly_the_registered_sids():
    trie, codes = _tiny_trie()
    assert trie.all_sids() == {tuple(c) for c in codes.tolist()}
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, 3] = True  # only item 3 = SID (1, 0)
    allowed = trie.allowed_nodes(mask)[0]
    assert bool(allowed[0]) and bool(allowed[trie.child[0, 1]]) and not bool(allowed[trie.child[0, 0]])


def test_beam_search_is_always_legal_on_random_logits():
    registry, _ = SIDRegistry.build(_vectors(200), levels=3, codebook_size=6, policy="keep")
    trie = registry.trie()
    legal = trie.all_sids()
    torch.manual_seed(0)

    def step(rows, prefix):
        return torch.randn(len(rows), registry.vocab_sizes[prefix.shape[1]]) * 5

    result = constrained_beam_search(step, batch=16, trie=trie, beam=12)
    for tokens, score in zip(result.tokens.view(-1, 3).tolist(), result.scores.view(-1).tolist()):
        if score > float("-inf"):
            assert tuple(tokens) in legal
    items, _ = items_from_beams(result, trie, max_items=30)
    assert ((items >= 0) & (items <= 200)).all() and (items[:, 0] > 0).all()


def test_beam_search_equals_exhaustive_search_on_a_tiny_vocabulary():
    trie, codes = _tiny_trie()
    g = torch.Generator().manual_seed(3)
    table = {(): torch.randn(2, 3, generator=g)}  # per request, per prefix
    for a in range(3):
        table[(a,)] = torch.randn(2, 3, generator=g)

    def step(rows, prefix):
        return torch.stack([table[tuple(p)][r] for r, p in zip(rows.tolist(), prefix.tolist())])

    result = constrained_beam_search(step, batch=2, trie=trie, beam=5)  # beam >= number of SIDs
    for request in range(2):
        exhaustive = sorted(
            (
                float(
                    torch.log_softmax(table[()][request], -1)[a]
                    + torch.log_softmax(table[(a,)][request], -1)[b]
                ),
                (a, b),
            )
            for a, b in codes.tolist()
        )[::-1]
        got = [(float(s), tuple(t)) for s, t in zip(result.scores[request], result.tokens[request].tolist())]
        assert [t for _, t in got] == [t for _, t in exhaustive]
        assert all(abs(s1 - s2) < 1e-5 for (s1, _), (s2, _) in zip(got, exhaustive))


def test_beam_search_respects_a_candidate_pool():
    trie, _ = _tiny_trie()
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, [2, 4]] = True
    mask[1, 5] = True

    def step(rows, prefix):
        return torch.zeros(len(rows), 3)

    result = constrained_beam_search(step, batch=2, trie=trie, beam=5, item_mask=mask)
    items, _ = items_from_beams(result, trie, max_items=5, item_mask=mask)
    assert set(items[0].tolist()) - {0} == {2, 4} and set(items[1].tolist()) - {0} == {5}


def test_q2i_alignment_variance_and_gradient():
    q = torch.nn.functional.normalize(torch.randn(8, 6, dtype=torch.float64), dim=-1)
    loss, cosine = q2i_loss(q, q.clone(), variance_weight=0.0, decorrelation_weight=0.0)
    assert cosine.item() == pytest.approx(1.0) and loss.item() == pytest.approx(-1.0)
    collapsed = torch.nn.functional.normalize(torch.ones(8, 6, dtype=torch.float64) + 1e-3 * q, dim=-1)
    spread, _ = q2i_loss(q, q, variance_weight=1.0, decorrelation_weight=0.0)
    tight, _ = q2i_loss(collapsed, collapsed, variance_weight=1.0, decorrelation_weight=0.0)
    assert tight > spread  # the variance term punishes collapse
    a = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)

    def f(x, y):
        return q2i_loss(torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1))[0]

    assert torch.autograd.gradcheck(f, (a, b))
    assert torch.autograd.gradcheck(
        lambda x, y: q2i_loss(
            torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(y, dim=-1), "infonce"
        )[0],
        (a, b),
    )
    with pytest.raises(ConfigError, match="unknown Q2I form 'cosine'"):
        q2i_loss(q, q, "cosine")


def _model(**kwargs) -> OxygenModel:
    codes = torch.tensor([[0, 0]] + [[i % 4, i // 4] for i in range(16)])
    return OxygenModel(codes, [4, 4], text_dim=8, num_scenarios=4, num_genres=3, profile_sizes=[2],
                       d_model=16, recent_len=3, long_len=8, igr_k=3, **kwargs)  # fmt: skip


def test_igr_keeps_the_items_closest_to_the_query():
    model = _model()
    torch.manual_seed(0)
    long_items = torch.tensor([[0, 5, 9, 2, 11, 7, 3, 14]])
    vectors = model.item_vector(long_items)[0].detach()
    planted = [4, 6, 1]  # positions of the items the query is built to be near
    q = torch.nn.functional.normalize(vectors[planted].sum(0), dim=-1).unsqueeze(0)
    kept = model.retrieve(long_items, q)[0].tolist()
    expected = long_items[0, (vectors @ q[0]).masked_fill(long_items[0] == 0, -9).topk(3).indices].tolist()
    assert kept == expected and set(kept) >= {11}
    recent = _model(igr="recent").retrieve(long_items, q)[0].tolist()
    assert recent == [14, 3, 7]  # the three newest
    assert _model(igr="none").retrieve(long_items, q).shape == (1, 0)
    short = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 4]])
    assert sorted(model.retrieve(short, q)[0].tolist()) == [0, 0, 4]  # padding never retrieved


def test_bad_configuration_is_named():
    with pytest.raises(ConfigError, match="unknown instruction 'verbose'"):
        _model(instruction="verbose")
    with pytest.raises(ConfigError, match="unknown igr 'dense'"):
        _model(igr="dense")


def test_minilm_text_encoder_works_offline_and_caches(tmp_path, monkeypatch):
    """The real encoder loads from the installed wheel with no network, and similar titles land
    closer than unrelated ones; the second call is served from the content-addressed cache."""
    from nestrec.oxygen import text

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    titles = ["Toy Story (1995) | Animation, Children's, Comedy", "Toy Story 2 (1999) | Animation, Children's, Comedy",
              "Schindler's List (1993) | Drama, War"]  # fmt: skip
    vectors = text.encode_cached(titles, "minilm", tmp_path)
    assert vectors.shape == (3, 384)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-4)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    [cached] = list(tmp_path.glob("text-minilm-*.npy"))
    monkeypatch.setattr(text, "encode_texts", lambda *a, **k: pytest.fail("cache was not used"))
    assert torch.equal(text.encode_cached(titles, "minilm", tmp_path), vectors) and cached.exists()
    with pytest.raises(ConfigError, match="unknown text encoder 'bert'"):
        text.encode_cached(titles, "bert", tmp_path)


def test_moe_decoder_routes_to_k_experts_and_balances():
    import copy

    from nestrec.oxygen.moe import MoEFeedForward

    torch.manual_seed(0)
    unbalanced = MoEFeedForward(d_model=8, ffn=16, experts=4, active=2, balance_rate=0.0)
    with torch.no_grad():
        unbalanced.router.weight[0] += 0.5  # a skewed router: expert 0 wins too often
    balanced = copy.deepcopy(unbalanced)
    balanced.balance_rate = 0.05
    x = torch.randn(256, 8)
    y = balanced(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert balanced.experts[0][0].weight.grad is not None  # gradients reach the chosen experts
    for _ in range(200):
        unbalanced(x), balanced(x)
    assert balanced.last_load.std() < unbalanced.last_load.std() / 2, (
        balanced.last_load,
        unbalanced.last_load,
    )
    model = _model(moe_experts=4, moe_active=2)
    assert any(isinstance(m, MoEFeedForward) for m in model.modules())
    with pytest.raises(ConfigError, match="MoE needs 1 <= active"):
        MoEFeedForward(8, 16, experts=2, active=3)


def test_scaled_embedding_init_starts_the_item_softmax_near_uniform():
    """The tied item softmax over item representations (ID + SID levels) must start within a
    few nats of the uniform loss, as SASRec's does; PyTorch's N(0, 1) tables start it tens of nats above (logits
    of std ~ sqrt(levels) * sqrt(d)), which measurably slowed pre-training (docs/oxygenrec.md)."""
    codes = torch.tensor([[0, 0, 0]] + [[i % 16, (i // 16) % 16, i % 7] for i in range(2000)])

    def initial_item_loss(init: str) -> float:
        torch.manual_seed(0)
        model = OxygenModel(codes, [16, 16, 7], text_dim=8, num_scenarios=4, num_genres=3, profile_sizes=[2],
                            d_model=64, embedding_init=init)  # fmt: skip
        catalogue = model.item_repr(torch.arange(1, 2001))
        state = model.enc_norm(torch.randn(256, 64))  # what the encoder hands the softmax: LayerNorm'd
        return float(F.cross_entropy(state @ catalogue.t(), torch.randint(0, 2000, (256,))))

    uniform = math.log(2000)  # + var(logits) / 2 ~ 2 nats for 4 tables of N(0, 1/d) summed
    assert abs(initial_item_loss("scaled") - uniform) < 3.0
    assert initial_item_loss("unit") > uniform + 10  # negative control: the old init is far off
    assert float(_model().item_id.weight[0].abs().sum()) == 0.0  # padding row stays zero
    with pytest.raises(ConfigError, match="unknown embedding_init 'xavier'"):
        _model(embedding_init="xavier")
