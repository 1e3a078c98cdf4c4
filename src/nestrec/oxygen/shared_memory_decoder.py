"""Beam-search decoding that projects each request's encoder memory once, not once per beam.

The reference decoding (``OxygenModel.next_logits`` on ``encoded[rows]``) repeats the encoder
memory for every beam and lets each decoder layer's cross-attention project that copy to keys and
values again, at every SID level. At beam 256 that projection is two thirds of the request's time
on a CPU (measured: 176 of 257 ms at d=64, 121 memory tokens). Every beam of a request attends to
the same memory, so here keys and values are projected once per request and layer, and the
queries of all its beams attend to them together: one attention call of ``beams x prefix``
queries against ``memory`` keys per request. Cross-attention has no interaction between query
positions, so this is the same computation, not an approximation; ``tests/test_serve.py`` checks
the logits against the reference.

This is the kind of work the paper's xGR engine does (a KV cache shared across beams). Layers this
does not know (post-norm, a decoder-level norm, extra key/value biases) fall back to the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nestrec.oxygen.model import OxygenModel

__all__ = ["SharedMemoryDecoder"]


@dataclass
class _Prepared:
    encoded: dict[str, torch.Tensor]
    keys: list[torch.Tensor]  # per layer [B, heads, M, head_dim]
    values: list[torch.Tensor]
    attend: torch.Tensor  # [B, 1, 1, M] bool, True = a real memory token


def _supported(model: OxygenModel) -> bool:
    return model.decodes_over_states  # the same layer shapes the dense training path re-implements


class SharedMemoryDecoder:
    """``prepare(encoded)`` once per batch, then ``next_logits(prepared, rows, prefix)`` per level."""

    def __init__(self, model: OxygenModel):
        self.model = model
        self.supported = _supported(model)

    def prepare(self, encoded: dict[str, torch.Tensor]) -> _Prepared:
        keys, values = [], []
        memory = encoded["memory"]
        b, m, d = memory.shape
        for layer in self.model.decoder.layers:
            mha = layer.multihead_attn
            heads = mha.num_heads
            w, bias = mha.in_proj_weight, mha.in_proj_bias
            k = F.linear(memory, w[d : 2 * d], None if bias is None else bias[d : 2 * d])
            v = F.linear(memory, w[2 * d :], None if bias is None else bias[2 * d :])
            keys.append(k.view(b, m, heads, d // heads).transpose(1, 2))
            values.append(v.view(b, m, heads, d // heads).transpose(1, 2))
        attend = (~encoded["pad"]).view(b, 1, 1, m)
        return _Prepared(encoded, keys, values, attend)

    def _cross(
        self, layer, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: torch.Tensor
    ) -> torch.Tensor:
        mha = layer.multihead_attn
        n, length, d = x.shape
        b, heads = k.shape[0], mha.num_heads
        width = n // b
        bias = mha.in_proj_bias
        q = F.linear(x, mha.in_proj_weight[:d], None if bias is None else bias[:d])
        q = (
            q.view(b, width, length, heads, d // heads)
            .permute(0, 3, 1, 2, 4)
            .reshape(b, heads, width * length, -1)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend)
        out = out.view(b, heads, width, length, d // heads).permute(0, 2, 3, 1, 4).reshape(n, length, d)
        return layer.dropout2(mha.out_proj(out))

    def _self(self, layer, x: torch.Tensor, last_only: bool) -> torch.Tensor:
        """Causal self-attention over the short decoder prefix; ``last_only``: just the newest position.

        The last layer only has to produce the newest position (the logits read nothing else), so
        its queries, cross-attention and feed-forward run on one position instead of all of them.
        """
        mha = layer.self_attn
        n, length, d = x.shape
        heads = mha.num_heads
        qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).view(n, length, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if last_only:
            out = F.scaled_dot_product_attention(q[:, :, -1:], k, v)
            length = 1
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return layer.dropout1(mha.out_proj(out.transpose(1, 2).reshape(n, length, d)))

    def next_logits(self, prepared: _Prepared, rows: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Logits of SID level ``prefix.shape[1]`` for each row (row ``i`` belongs to request ``rows[i]``)."""
        model, b = self.model, prepared.attend.shape[0]
        n = len(rows)
        grouped = n % b == 0 and torch.equal(
            rows, torch.arange(b, device=rows.device).repeat_interleave(n // b)
        )
        if not self.supported or not grouped:  # not beams-of-requests in order: the reference path
            return model.next_logits({k: v[rows] for k, v in prepared.encoded.items()}, prefix)
        state = prepared.encoded.get("slot_state")
        start = model.decoder_prefix(prepared.encoded["instr"][rows], None if state is None else state[rows])
        parts = [start] + [model.tokens[i](prefix[:, i]).unsqueeze(1) for i in range(prefix.shape[1])]
        x = torch.cat(parts, 1)
        x = x + model.dec_pos(torch.arange(x.shape[1], device=x.device))
        layers = list(model.decoder.layers)
        for index, (layer, k, v) in enumerate(zip(layers, prepared.keys, prepared.values)):
            last_only = index == len(layers) - 1
            attended = self._self(layer, layer.norm1(x), last_only)
            x = (x[:, -1:] if last_only else x) + attended
            x = x + self._cross(layer, layer.norm2(x), k, v, prepared.attend)
            x = x + layer._ff_block(layer.norm3(x))
        return model.heads[prefix.shape[1]](model.dec_norm(x)[:, -1])
