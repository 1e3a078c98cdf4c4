"""Item vectors for the semantic-ID tokenizer: content (text), collaborative (co-occurrence), fused.

Text vectors alone make a weak tokenizer for MovieLens: titles and genre words say little about
who watches a film with what, so items a user would pick next land in unrelated codes and the
generator must learn every transition token by token. The collaborative vector is a truncated SVD
of the positive pointwise mutual information (PPMI) of items watched within ``window`` steps of
each other in the *training* sequences (Levy & Goldberg's word2vec-as-factorisation result: the
same signal item2vec learns, in one sparse solve). ``fused`` concatenates the two L2-normalised
vectors (the paper's multi-source SIDs), ``text_weight`` setting their balance.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nestrec.errors import ConfigError

__all__ = ["SID_SOURCES", "cooccurrence_vectors", "sid_vectors"]

SID_SOURCES = ("text", "collaborative", "fused")


def cooccurrence_vectors(
    sequences: list[np.ndarray], num_items: int, dim: int = 64, window: int = 5, seed: int = 0
) -> torch.Tensor:
    """``[num_items, dim]`` PPMI-SVD vectors (row i = item i + 1); items never seen get zeros."""
    left, right = [], []
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int64)
        for offset in range(1, window + 1):
            if len(seq) > offset:
                left.append(seq[:-offset])
                right.append(seq[offset:])
    if not left:
        return torch.zeros(num_items, dim)
    a, b = np.concatenate(left), np.concatenate(right)
    rows, cols = np.concatenate([a, b]) - 1, np.concatenate([b, a]) - 1  # symmetric, 0-based
    counts = torch.sparse_coo_tensor(
        torch.from_numpy(np.stack([rows, cols])),
        torch.ones(len(rows), dtype=torch.float64),
        (num_items, num_items),
        check_invariants=True,
    ).coalesce()
    index, values = counts.indices(), counts.values()
    marginal = torch.zeros(num_items, dtype=torch.float64).index_add_(0, index[0], values)
    total = values.sum()
    pmi = torch.log(values * total / (marginal[index[0]] * marginal[index[1]]))
    keep = pmi > 0
    ppmi = torch.sparse_coo_tensor(
        index[:, keep], pmi[keep], (num_items, num_items), check_invariants=True
    ).coalesce()
    rank = min(dim, num_items - 1)
    torch.manual_seed(seed)  # svd_lowrank's random projection
    u, s, _ = torch.svd_lowrank(ppmi, q=rank + 8, niter=4)
    vectors = (u[:, :rank] * s[:rank].sqrt()).float()
    return F.pad(vectors, (0, dim - rank)) if rank < dim else vectors


def sid_vectors(
    source: str, text: torch.Tensor, sequences: list[np.ndarray], text_weight: float = 0.5, seed: int = 0
) -> torch.Tensor:
    """What RQ-KMeans tokenises for ``source`` (``text`` ``[num_items, d]``, row i = item i + 1)."""
    if source not in SID_SOURCES:
        raise ConfigError(f"unknown sid_source {source!r}; expected one of {', '.join(SID_SOURCES)}")
    if source == "text":
        return text
    collaborative = cooccurrence_vectors(sequences, len(text), seed=seed)
    if source == "collaborative":
        return collaborative
    if not 0.0 <= text_weight <= 1.0:
        raise ConfigError(f"sid_text_weight must be in [0, 1], got {text_weight}")
    return torch.cat(
        [
            F.normalize(text.float(), dim=1) * text_weight,
            F.normalize(collaborative, dim=1) * (1 - text_weight),
        ],
        1,
    )
