"""DLRM-style CTR model (Naumov et al., 2019) whose tables live in a ``ShardedEmbeddingCollection``.

The first model trained by ``strategy=nestpipe``: a bottom MLP over dense features, one row-sharded
table per sparse feature (pooled), pairwise dot-product interactions, a top MLP, binary
cross-entropy. Dense layers use the ordinary torch optimizer and DDP's all-reduce; tables use the
row-wise sparse optimizer of the collection. AUC comes from torchmetrics (which gathers across ranks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import BinaryAUROC

from nestrec.embedding.config import EmbeddingTableConfig
from nestrec.pipeline.lightning import PipelinedLightningModule
from nestrec.sharding import ShardedEmbeddingCollection, build_row_optimizer

__all__ = ["DLRM", "DLRMModule"]


def mlp(sizes: list[int], final_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DLRM(nn.Module):
    def __init__(
        self,
        tables: list[EmbeddingTableConfig],
        num_dense: int,
        dim: int,
        bottom: list[int],
        top: list[int],
        embeddings: nn.Module,
    ):
        super().__init__()
        self.features = [f for t in tables for f in t.features]
        self.embeddings = embeddings
        self.bottom = mlp([num_dense, *bottom, dim], final_activation=True)
        vectors = len(self.features) + 1
        self.register_buffer("pairs", torch.triu_indices(vectors, vectors, offset=1), persistent=False)
        self.top = mlp([dim + vectors * (vectors - 1) // 2, *top, 1], final_activation=False)

    def forward(self, features, dense: torch.Tensor) -> torch.Tensor:
        return self.interact(self.embeddings(features), dense)

    def interact(self, pooled: dict[str, torch.Tensor], dense: torch.Tensor) -> torch.Tensor:
        """Everything after the embedding lookup: the part pipelines run per micro-batch."""
        stacked = torch.stack([self.bottom(dense)] + [pooled[f] for f in self.features], dim=1)  # [B, V, D]
        dots = torch.bmm(stacked, stacked.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]
        return self.top(torch.cat([stacked[:, 0], dots], dim=1)).squeeze(1)


class DLRMModule(PipelinedLightningModule):
    """Lightning stage for DLRM. ``table_sizes`` comes from the data module.

    Built on :class:`PipelinedLightningModule`, so every ``strategy.pipeline`` schedule trains it:
    its loss is a per-sample sum (BCE), with no coupling between samples.
    """

    def __init__(
        self,
        table_sizes: dict[str, int],
        num_dense: int = 1,
        dim: int = 16,
        bottom: tuple[int, ...] = (32,),
        top: tuple[int, ...] = (64, 32),
        lr: float = 1e-3,
        sparse_optimizer: str = "adagrad",
        sparse_lr: float = 0.05,
        sharding: str = "range",
        init_std: float = 0.05,
        seed: int = 0,
        gradient_clip_val: float | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.gradient_clip_val = gradient_clip_val
        pooling = {"genre": "mean"}
        self.tables = [
            EmbeddingTableConfig(
                name, num_rows=int(rows), dim=dim, features=(name,), pooling=pooling.get(name, "sum")
            )
            for name, rows in table_sizes.items()
        ]
        embeddings = ShardedEmbeddingCollection(
            self.tables,
            optimizer=build_row_optimizer(sparse_optimizer, lr=sparse_lr),
            sharding=sharding,
            init_std=init_std,
            seed=seed,
        )
        self.model = DLRM(self.tables, num_dense, dim, list(bottom), list(top), embeddings)
        self.val_auc = BinaryAUROC()
        self.test_auc = BinaryAUROC()

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(batch["features"], batch["dense"])

    # -- PipelinedModel contract: the engine runs training (lookup, micro-batches, updates) ----------
    def sharded_tables(self) -> ShardedEmbeddingCollection:
        return self.model.embeddings

    def sparse_features(self, batch: dict):
        return batch["features"]

    def select_samples(self, batch: dict, index: torch.Tensor) -> dict:
        return {
            "features": batch["features"].select_samples(index),
            "dense": batch["dense"][index],
            "label": batch["label"][index],
        }

    def loss_sum(self, batch: dict, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.model.interact(pooled, batch["dense"])
        return F.binary_cross_entropy_with_logits(logits, batch["label"], reduction="sum")

    def _evaluate(self, batch: dict, stage: str, auc: BinaryAUROC) -> None:
        logits = self(batch)
        loss = F.binary_cross_entropy_with_logits(logits, batch["label"])
        auc.update(torch.sigmoid(logits), batch["label"].long())
        self.log(f"{stage}/logloss", loss, sync_dist=True, batch_size=len(batch["label"]))
        self.log(f"{stage}/auc", auc, prog_bar=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_auc)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_auc)

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.hparams.lr)
