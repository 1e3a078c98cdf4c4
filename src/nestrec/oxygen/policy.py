"""Group policy-optimisation objectives: GRPO, GSPO, SAPO and SA-GCPO (design brief §9).

All four share the rollout and the group-normalised advantage ``Â_i = (R_i − mean_G R) / std_G R``
and differ in two places, which is why they are one function with a ``method`` switch:

=========  ============  ==============================================  ====================
method     ratio         trust region                                    advantage
=========  ============  ==============================================  ====================
grpo       token         hard clip ``min(rA, clip(r, 1±ε)A)``            Â
gspo       sequence      hard clip on the geometric-mean ratio, tiny ε   Â
sapo       token         soft gate ``f(r) = σ(τ(r−1))·4/τ``               Â
sagcpo     token         soft gate, ``τ = τ_pos if Γ > 0 else τ_neg``     Γ = group clip of Â
=========  ============  ==============================================  ====================

The **group clip** zeroes a positive advantage whose reward is still below the ground-truth
item's reward ``R*``: being the best of a bad group earns nothing; negatives keep their push.
The soft gate's derivative ``w = 4p(1−p)`` (``p = σ(τ(r−1))``) is exactly 1 at ``r = 1``, so at the
first inner step SA-GCPO's gradient equals GRPO's; away from 1 it decays smoothly instead of
dropping to zero at a hard boundary. Aggregation: token mean per sequence, then mean over the
valid candidates of all groups (``(1/G) Σ_i (1/|y_i|) Σ_t``).
"""

from __future__ import annotations

import torch

__all__ = ["METHODS", "gate_weight", "group_advantages", "group_clip", "policy_loss", "soft_gate"]

METHODS = ("grpo", "gspo", "sapo", "sagcpo")


def group_advantages(
    rewards: torch.Tensor, valid: torch.Tensor | None = None, eps: float = 1e-6
) -> torch.Tensor:
    """Z-score of rewards within each group (row) ``[B, G]``; invalid candidates get 0 and are ignored."""
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid
    count = valid.sum(1, keepdim=True).clamp(min=1)
    mean = (rewards * valid).sum(1, keepdim=True) / count
    var = (((rewards - mean) * valid) ** 2).sum(1, keepdim=True) / count
    return ((rewards - mean) / var.sqrt().clamp(min=eps)) * valid


def group_clip(
    advantages: torch.Tensor, rewards: torch.Tensor, gt_reward: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Γ, suppressed): positive advantages of candidates whose reward is below ``R*`` set to 0."""
    suppressed = (advantages > 0) & (rewards < gt_reward.unsqueeze(1))
    return advantages.masked_fill(suppressed, 0.0), suppressed


def soft_gate(ratio: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """SAPO's ``f(ρ) = σ(τ(ρ − 1)) · 4/τ``; ``f'(1) = 1``."""
    return torch.sigmoid(tau * (ratio - 1)) * 4 / tau


def gate_weight(ratio: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """``f'(ρ) = 4 p (1 − p)`` with ``p = σ(τ(ρ − 1))``: how much gradient a token still passes."""
    p = torch.sigmoid(tau * (ratio - 1))
    return 4 * p * (1 - p)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    method: str,
    valid: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    seq_clip_eps: float = 3e-4,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (= −J) and diagnostics for token log-probs ``[B, G, L]`` and advantages ``[B, G]``.

    For ``sagcpo`` pass group-clipped advantages (:func:`group_clip`); the function does not see R.
    """
    if method not in METHODS:
        raise ValueError(f"unknown policy method {method!r}; known: {', '.join(METHODS)}")
    valid = torch.ones_like(advantages, dtype=torch.bool) if valid is None else valid
    log_ratio = logp - old_logp
    a = advantages
    stats: dict[str, torch.Tensor] = {}
    if method == "gspo":
        ratio = torch.exp(log_ratio.mean(-1))  # geometric mean of token ratios
        clipped = ratio.clamp(1 - seq_clip_eps, 1 + seq_clip_eps)
        objective = torch.minimum(ratio * a, clipped * a)
        stats["clip_fraction"] = _masked_mean(((ratio * a) > (clipped * a)).float(), valid)
        stats["ratio"] = _masked_mean(ratio.detach(), valid)
    else:
        ratio = torch.exp(log_ratio)
        a_tok = a.unsqueeze(-1)
        if method == "grpo":
            clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps)
            per_token = torch.minimum(ratio * a_tok, clipped * a_tok)
            stats["clip_fraction"] = _masked_mean(
                ((ratio * a_tok) > (clipped * a_tok)).float().mean(-1), valid
            )
        else:
            tau = torch.where(a_tok > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
            per_token = soft_gate(ratio, tau) * a_tok
            stats["gate_weight"] = _masked_mean(gate_weight(ratio.detach(), tau).mean(-1), valid)
        objective = per_token.mean(-1)  # token mean per sequence
        stats["ratio"] = _masked_mean(ratio.detach().mean(-1), valid)
    loss = -_masked_mean(objective, valid)
    return loss, stats


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)
