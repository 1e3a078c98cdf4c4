"""Query-to-Item (Q2I) alignment loss (OxygenREC Eq. 2) and its InfoNCE variant.

``L = −mean_i(q_i · t_i) + λ_r · (−log(Var(Q) · Var(T))) + λ_d · mean_{i≠j}(q_i · q_j)²``

The first term pulls each instruction query toward its target item in the shared item space
(where IGR scores history items); the variance term keeps the batch from collapsing to one
point; the decorrelation term keeps different users' queries apart. ``Var(X)`` is the mean over
dimensions of the per-dimension batch variance, clamped at 1e-8 (design brief §6; the paper
does not pin λ_r, λ_d: 0.01 each by default). ``infonce`` is the in-batch contrastive switch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nestrec.errors import ConfigError

__all__ = ["Q2I_FORMS", "batch_variance", "q2i_loss"]

Q2I_FORMS = ("paper", "infonce")


def batch_variance(x: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension batch variance: ~1/D when spread, 0 when collapsed."""
    return x.var(0, unbiased=False).mean()


def q2i_loss(
    q: torch.Tensor,
    t: torch.Tensor,
    form: str = "paper",
    variance_weight: float = 0.01,
    decorrelation_weight: float = 0.01,
    temperature: float = 0.07,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, mean cosine) for L2-normalised queries ``q`` and targets ``t`` (``[B, D]`` each)."""
    if form not in Q2I_FORMS:
        raise ConfigError(f"unknown Q2I form {form!r}; expected one of {', '.join(Q2I_FORMS)}")
    cosine = (q * t).sum(-1)
    if form == "infonce":
        logits = q @ t.t() / temperature
        return F.cross_entropy(logits, torch.arange(len(q), device=q.device)), cosine.mean()
    b = len(q)
    loss = -cosine.mean()
    if b > 1:
        var_q = batch_variance(q).clamp(min=1e-8)
        var_t = batch_variance(t).clamp(min=1e-8)
        loss = loss + variance_weight * -torch.log(var_q * var_t)
        gram = q @ q.t()
        off = gram[~torch.eye(b, dtype=torch.bool, device=q.device)]
        loss = loss + decorrelation_weight * (off**2).mean()
    return loss, cosine.mean()
