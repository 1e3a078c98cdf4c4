"""Trie-constrained beam search over semantic IDs: batched, vectorised, legal by construction.

At every level each beam may only extend along an existing trie edge (``child[node, token] >= 0``)
and, when a per-request candidate pool is given (a genre channel, a business rule), only into
nodes with at least one allowed item below them. Illegal continuations get ``-inf`` before the
top-k, so no decoded SID can be outside the registry or the pool. The model is asked for one
level's log-probabilities at a time for all ``batch × beam`` prefixes at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nestrec.oxygen.sid import PrefixTrie

__all__ = ["BeamResult", "constrained_beam_search", "items_from_beams"]

StepFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class BeamResult:
    tokens: torch.Tensor  # [B, W, depth] SID tokens of each beam
    scores: torch.Tensor  # [B, W] total log-probability (-inf for unused beams)
    leaves: torch.Tensor  # [B, W] trie leaf node of each beam


def constrained_beam_search(
    step: StepFn,
    batch: int,
    trie: PrefixTrie,
    beam: int,
    item_mask: torch.Tensor | None = None,
) -> BeamResult:
    """``step(rows [N], prefix [N, level]) -> logits [N, vocab_level]`` for ``N = batch × beams``.

    ``rows`` says which request each prefix belongs to (the caller repeats its encoder memory).
    """
    device = trie.child.device
    width = trie.child.shape[1]
    allowed = trie.allowed_nodes(item_mask) if item_mask is not None else None  # [B, nodes]
    node = torch.zeros(batch, 1, dtype=torch.long, device=device)
    score = torch.zeros(batch, 1, device=device)
    tokens = torch.zeros(batch, 1, 0, dtype=torch.long, device=device)
    for level in range(trie.depth):
        beams = node.shape[1]
        rows = torch.arange(batch, device=device).repeat_interleave(beams)
        logits = step(rows, tokens.reshape(batch * beams, level)).float()
        logp = torch.log_softmax(logits, dim=-1)
        if logp.shape[1] < width:
            logp = torch.nn.functional.pad(logp, (0, width - logp.shape[1]), value=float("-inf"))
        logp = logp[:, :width].view(batch, beams, width)
        children = trie.child[node]  # [B, beams, width]
        legal = children >= 0
        if allowed is not None:
            legal &= allowed.gather(1, children.clamp(min=0).view(batch, -1)).view_as(children)
        candidates = (score.unsqueeze(-1) + logp).masked_fill(~legal, float("-inf")).view(batch, -1)
        top, index = candidates.topk(min(beam, candidates.shape[1]), dim=1)
        parent, token = index // width, index % width
        node = children.view(batch, -1).gather(1, index)
        tokens = torch.cat(
            [tokens.gather(1, parent.unsqueeze(-1).expand(-1, -1, level)), token.unsqueeze(-1)], -1
        )
        score = top
    node = node.masked_fill(torch.isinf(score), -1)
    return BeamResult(tokens, score, node)


def items_from_beams(
    result: BeamResult, trie: PrefixTrie, max_items: int, item_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expand beams (best first) into item ids ``[B, max_items]`` (0-padded) and their beam scores.

    A SID shared by several items (``keep`` collisions) yields all of them, most popular first,
    with the SID's score; items outside the request's pool are dropped.
    """
    batch = result.leaves.shape[0]
    items = torch.zeros(batch, max_items, dtype=torch.long)
    scores = torch.full((batch, max_items), float("-inf"))
    leaves, beam_scores = result.leaves.cpu(), result.scores.cpu()
    mask = item_mask.cpu() if item_mask is not None else None
    for b in range(batch):
        filled = 0
        for leaf, value in zip(leaves[b].tolist(), beam_scores[b].tolist()):
            if leaf < 0 or filled >= max_items:
                continue
            for item in trie.leaf_items[leaf]:
                if mask is not None and not bool(mask[b, item]):
                    continue
                items[b, filled], scores[b, filled] = item, value
                filled += 1
                if filled >= max_items:
                    break
    return items, scores
