"""The unsharded ``EmbeddingCollection``: plain ``nn.Embedding`` tables, the readable reference.

``ShardedEmbeddingCollection`` (``nestrec.sharding``) produces the same outputs from row-sharded
tables; the equivalence tests train both and compare every row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nestrec.embedding.config import EmbeddingTableConfig
from nestrec.errors import UserInputError
from nestrec.sparse.jagged import JaggedFeatures

__all__ = ["EmbeddingCollection", "pool", "check_ids"]


def check_ids(ids: torch.Tensor, table: EmbeddingTableConfig, feature: str) -> None:
    """Reject ids outside ``[0, num_rows)`` with an error naming the feature, table and id."""
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= table.num_rows:
        bad = low if low < 0 else high
        raise UserInputError(
            f"feature {feature!r}: id {bad} is outside table {table.name!r} rows [0, {table.num_rows})"
        )


def pool(rows: torch.Tensor, lengths: torch.Tensor, mode: str) -> torch.Tensor:
    """Sum or mean per sample over a feature's ids (``mode='none'`` returns ``rows`` unchanged)."""
    if mode == "none":
        return rows
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=rows.device), lengths)
    out = torch.zeros(len(lengths), rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(
        0, segment, rows
    )
    if mode == "mean":
        out = out / lengths.clamp(min=1).unsqueeze(1).to(rows.dtype)
    return out


class EmbeddingCollection(nn.Module):
    """Dense tables; ``forward(features)`` → ``{feature: pooled [B, dim] or per-id [N, dim]}``."""

    def __init__(
        self,
        tables: Sequence[EmbeddingTableConfig],
        dtype: torch.dtype | None = None,
        sparse_grad: bool = False,
    ):
        super().__init__()
        self.tables = list(tables)
        self.embeddings = nn.ModuleDict(
            {t.name: nn.Embedding(t.num_rows, t.dim, dtype=dtype, sparse=sparse_grad) for t in self.tables}
        )
        self.feature_to_table = {f: t for t in self.tables for f in t.features}

    def forward(self, features: JaggedFeatures) -> dict[str, torch.Tensor]:
        out = {}
        for feature, (values, lengths) in features.split().items():
            table = self.feature_to_table[feature]
            check_ids(values, table, feature)
            out[feature] = pool(self.embeddings[table.name](values), lengths, table.pooling)
        return out
