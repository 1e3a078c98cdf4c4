"""``ShardedItemEmbedding``: an ``nn.Embedding``-shaped view of one row-sharded item table.

Models that look items up as ``ids[...] -> rows[..., dim]`` (SASRec's input table, OxygenREC's
item-ID embedding) swap ``nn.Embedding`` for this with a config change (``embedding: sharded``);
under ``strategy=nestpipe`` the table is row-sharded over every process and trained by its
row-wise optimizer, the dense rest by DDP.
"""

from __future__ import annotations

import torch
from torch import nn

from nestrec.embedding.config import EmbeddingTableConfig
from nestrec.sharding.collection import ShardedEmbeddingCollection
from nestrec.sharding.optim import build_row_optimizer
from nestrec.sparse.jagged import JaggedFeatures

__all__ = ["ShardedItemEmbedding"]


class ShardedItemEmbedding(nn.Module):
    """Item ids of any shape → rows ``[*shape, dim]`` from a row-sharded table (row 0 = padding)."""

    def __init__(
        self, num_items: int, dim: int, sparse_optimizer: str, sparse_lr: float, sharding: str, seed: int
    ):
        super().__init__()
        table = EmbeddingTableConfig(
            "item", num_rows=num_items + 1, dim=dim, features=("history",), pooling="none"
        )
        self.tables = ShardedEmbeddingCollection(
            [table],
            optimizer=build_row_optimizer(sparse_optimizer, lr=sparse_lr),
            sharding=sharding,
            init_std=dim**-0.5,
            seed=seed,
        )

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        flat = items.reshape(1, -1)
        lengths = torch.full((1,), flat.shape[1], dtype=torch.long, device=items.device)
        rows = self.tables(JaggedFeatures.from_dict({"history": (flat.reshape(-1), lengths)}))["history"]
        return rows.view(*items.shape, -1)
