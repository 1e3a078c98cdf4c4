"""SA-GCPO and its relatives on hand-computed cases, and the unified reward map."""

from __future__ import annotations

import pytest
import torch

from nestrec.errors import ConfigError
from nestrec.oxygen.policy import gate_weight, group_advantages, group_clip, policy_loss, soft_gate
from nestrec.oxygen.reward import UnifiedRewardMap

HEADS = ("watch", "like", "love")


def test_group_advantages_are_z_scores_per_group():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    adv = group_advantages(rewards)
    assert torch.allclose(adv[0], torch.tensor([-1.2247449, 0.0, 1.2247449]), atol=1e-6)
    assert torch.equal(adv[1], torch.zeros(3))  # an all-equal group teaches nothing
    masked = group_advantages(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[True, True, False]]))
    assert torch.allclose(masked, torch.tensor([[-1.0, 1.0, 0.0]]))


def test_group_clip_zeroes_exactly_the_positive_advantages_below_the_ground_truth():
    rewards = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    adv = group_advantages(rewards)  # [-1.34, -0.45, 0.45, 1.34] per row
    gt = torch.tensor([2.5, -10.0])
    clipped, suppressed = group_clip(adv, rewards, gt)
    # Row 0: candidate 2 (reward 2 < 2.5, positive) is suppressed; candidate 3 (3 >= 2.5) keeps its credit;
    # negatives keep their push. Row 1: the ground truth is worse than everything: nothing suppressed.
    assert suppressed.tolist() == [[False, False, True, False], [False, False, False, False]]
    assert clipped[0, 2] == 0 and clipped[0, 3] == adv[0, 3] and torch.equal(clipped[0, :2], adv[0, :2])
    assert torch.equal(clipped[1], adv[1])


def test_soft_gate_weight_is_one_at_ratio_one_and_decays_away_from_it():
    ratio = torch.tensor([1.0, 1.0, 1.5, 0.5, 3.0], requires_grad=True)
    tau = torch.tensor([1.0, 5.0, 1.0, 1.05, 2.0])
    soft_gate(ratio, tau).sum().backward()
    assert torch.allclose(ratio.grad, gate_weight(ratio.detach(), tau))
    assert torch.allclose(ratio.grad[:2], torch.ones(2))
    assert (ratio.grad[2:] < 1).all() and (ratio.grad[2:] > 0).all()


def _logp(seed: int, shape=(2, 4, 3)) -> torch.Tensor:
    return torch.log_softmax(torch.randn(*shape, 5, generator=torch.Generator().manual_seed(seed)), -1)[
        ..., 0
    ]


@pytest.mark.parametrize("method", ["sagcpo", "sapo", "gspo"])
def test_gradient_equals_grpo_at_ratio_one_when_nothing_is_clipped(method):
    """With R* = -inf (no group clip) and π = π_old, every method's gradient is GRPO's (no KL)."""
    base = _logp(0)
    rewards = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    adv, _ = group_clip(group_advantages(rewards), rewards, torch.full((2,), float("-inf")))
    grads = {}
    for name in ("grpo", method):
        logp = base.clone().requires_grad_(True)
        loss, stats = policy_loss(logp, base.detach(), adv, name)
        loss.backward()
        grads[name] = logp.grad
        if name in ("sagcpo", "sapo"):
            assert stats["gate_weight"].item() == pytest.approx(1.0)
    assert torch.allclose(grads["grpo"], grads[method], atol=1e-6)
    # And the GRPO gradient itself: -A / (G·B·L) per token (token mean, then mean over candidates).
    assert torch.allclose(grads["grpo"], -adv.unsqueeze(-1).expand(2, 4, 3) / (2 * 4 * 3), atol=1e-6)


def test_grpo_hard_clip_on_a_hand_case():
    old = torch.zeros(1, 2, 1)
    logp = torch.log(torch.tensor([[[1.5], [0.5]]])).requires_grad_(True)  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    loss, stats = policy_loss(logp, old, adv, "grpo", clip_eps=0.2)
    # min(1.5·1, 1.2·1) = 1.2 ; min(0.5·-1, 0.8·-1) = -0.8 → J = 0.2, loss = -0.2; both clipped → no gradient.
    assert loss.item() == pytest.approx(-0.2)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))
    assert stats["clip_fraction"].item() == pytest.approx(1.0)


def test_sagcpo_positive_and_negative_temperatures_differ():
    old = torch.zeros(1, 2, 1)
    logp = torch.log(torch.tensor([[[1.3], [1.3]]])).requires_grad_(True)
    policy_loss(logp, old, torch.tensor([[1.0, -1.0]]), "sagcpo", tau_pos=1.0, tau_neg=5.0)[0].backward()
    g_pos, g_neg = logp.grad[0, 0, 0].abs(), logp.grad[0, 1, 0].abs()
    assert g_neg < g_pos  # a larger tau decays the gate faster away from ratio 1


# -- reward map -------------------------------------------------------------------------------------
def _map(**override):
    scenarios = {
        "homepage": {"weights": {"format": 1.0, "ranking": 1.0}, "value": "watch + 0.5 * like"},
        "search": {"weights": {"relevance": 2.0}, "value": "watch"},
    }
    scenarios.update(override)
    return UnifiedRewardMap(scenarios, HEADS)


def test_reward_map_per_scenario_by_hand():
    reward_map = _map()
    scenario = torch.tensor([0, 3])  # homepage, search
    legal = torch.tensor([[True, True, False], [True, True, True]])
    relevance = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.4, 0.6]])
    heads = {
        "watch": torch.tensor([[0.2, 0.6, 0.9], [0.5, 0.5, 0.5]]),
        "like": torch.tensor([[0.4, 0.0, 0.9], [0.1, 0.1, 0.1]]),
        "love": torch.zeros(2, 3),
    }
    sids = torch.tensor([[[0, 1], [0, 2], [1, 1]], [[0, 0], [0, 0], [1, 1]]])
    reward, raw = reward_map(scenario, legal, relevance, heads, sids)

    def z(x):
        x = torch.tensor(x)
        return (x - x.mean()) / x.std(unbiased=False)

    # homepage: format [1,1,0] and ranking (watch + 0.5 like, 0 when illegal) = [0.4, 0.6, 0]
    assert torch.allclose(reward[0], z([1.0, 1.0, 0.0]) + z([0.4, 0.6, 0.0]), atol=1e-5)
    # search: only relevance, weight 2
    assert torch.allclose(reward[1], 2 * z([0.2, 0.4, 0.6]), atol=1e-5)
    # diversity: mean Hamming fraction to the others: row 1 = [(0+1)/2, (0+1)/2, (1+1)/2]
    assert torch.allclose(raw["diversity"][1], torch.tensor([0.5, 0.5, 1.0]))
    assert not raw["engagement"].any()  # no logged SID given: the term is off


def test_engagement_is_the_shared_sid_prefix_with_the_logged_item():
    reward_map = UnifiedRewardMap({"homepage": {"weights": {"engagement": 1.0}}}, HEADS)
    sids = torch.tensor([[[1, 2, 3], [1, 2, 0], [1, 0, 3], [0, 2, 3]]])
    legal = torch.ones(1, 4, dtype=torch.bool)
    heads = {h: torch.zeros(1, 4) for h in HEADS}
    reward, raw = reward_map(
        torch.tensor([0]), legal, torch.zeros(1, 4), heads, sids, torch.tensor([[1, 2, 3]])
    )
    # prefix agreement, not position-wise agreement: [1,0,3] shares only its first level
    assert torch.allclose(raw["engagement"][0], torch.tensor([1.0, 2 / 3, 1 / 3, 0.0]))
    assert reward[0].argmax() == 0 and torch.all(reward[0, :-1] > reward[0, 1:])


def test_reward_map_rejects_bad_config_with_one_line_errors():
    with pytest.raises(ConfigError, match="unknown term"):
        _map(homepage={"weights": {"gmv": 1.0}})
    with pytest.raises(ConfigError, match="unknown scenario"):
        _map(checkout={"weights": {"format": 1.0}})
    with pytest.raises(ConfigError, match="unknown name 'price'"):
        _map(homepage={"value": "love * price"})
    with pytest.raises(ConfigError, match="may only use"):
        _map(homepage={"value": "__import__('os')"})
    with pytest.raises(ConfigError, match="no scenarios"):
        UnifiedRewardMap({}, HEADS)
    with pytest.raises(ConfigError, match="no entry for trained scenario"):
        _map().check_covers(["homepage", "related"])


def test_absent_candidates_neither_score_nor_shift_the_normalisation():
    reward_map = UnifiedRewardMap({"homepage": {"weights": {"ranking": 1.0, "diversity": 0.5}}}, HEADS)
    watch = torch.tensor([[0.2, 0.5, 0.9]])
    sids = torch.tensor([[[0, 1], [0, 2], [1, 1]]])
    base, _ = reward_map(torch.tensor([0]), torch.ones(1, 3, dtype=torch.bool), torch.zeros(1, 3),
                         {"watch": watch, "like": torch.zeros(1, 3), "love": torch.zeros(1, 3)}, sids)  # fmt: skip
    padded, _ = reward_map(
        torch.tensor([0]), torch.tensor([[True, True, True, False]]), torch.zeros(1, 4),
        {"watch": torch.cat([watch, torch.zeros(1, 1)], 1), "like": torch.zeros(1, 4), "love": torch.zeros(1, 4)},
        torch.cat([sids, torch.zeros(1, 1, 2, dtype=torch.long)], 1), present=torch.tensor([[True, True, True, False]]),
    )  # fmt: skip
    assert torch.allclose(padded[0, :3], base[0], atol=1e-6) and padded[0, 3] == 0
