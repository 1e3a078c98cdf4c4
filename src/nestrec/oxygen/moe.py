"""Mixture-of-experts feed-forward for the decoder (OxygenREC's larger models put MoE capacity in
the decoder; design brief §4: top-k routing with DeepSeek-style loss-free load balancing).

Each token goes to its ``active`` highest-scoring experts; their outputs are mixed by the
softmax of those scores. Balancing adds a *non-learned* per-expert bias to the scores used for
*selection only*: after each training step, overloaded experts' bias goes down and underloaded
ones' up by ``balance_rate`` (no auxiliary loss term competing with the objective).
"""

from __future__ import annotations

import torch
from torch import nn

from nestrec.errors import ConfigError

__all__ = ["MoEFeedForward", "MoEDecoderLayer"]


class MoEFeedForward(nn.Module):
    def __init__(self, d_model: int, ffn: int, experts: int, active: int = 2, balance_rate: float = 1e-3):
        super().__init__()
        if not 1 <= active <= experts:
            raise ConfigError(f"MoE needs 1 <= active ({active}) <= experts ({experts})")
        self.active, self.balance_rate = active, balance_rate
        self.router = nn.Linear(d_model, experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d_model, ffn), nn.GELU(), nn.Linear(ffn, d_model)) for _ in range(experts)
        )
        self.register_buffer("balance_bias", torch.zeros(experts))
        self.last_load: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        scores = self.router(tokens)
        _, chosen = (scores + self.balance_bias).topk(self.active, dim=-1)
        gates = torch.softmax(scores.gather(1, chosen), dim=-1)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if len(rows):
                out.index_add_(0, rows, expert(tokens[rows]) * gates[rows, slot].unsqueeze(-1))
        load = torch.bincount(chosen.flatten(), minlength=len(self.experts)).float()
        self.last_load = load / load.sum().clamp(min=1)
        if self.training:
            with torch.no_grad():
                self.balance_bias += self.balance_rate * torch.sign(self.last_load.mean() - self.last_load)
        return out.view(shape)


class MoEDecoderLayer(nn.TransformerDecoderLayer):
    """``nn.TransformerDecoderLayer`` whose feed-forward block is a :class:`MoEFeedForward`."""

    def __init__(self, d_model: int, nhead: int, ffn: int, dropout: float, experts: int, active: int):
        super().__init__(d_model, nhead, ffn, dropout, batch_first=True, norm_first=True)
        del self.linear1, self.linear2
        self.moe = MoEFeedForward(d_model, ffn, experts, active)

    def _ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout3(self.moe(x))
