"""The unified multi-scenario ranker: the reward model SA-GCPO asks "how good is this item here?".

Design brief §7: one ranker for all scenarios, scenario-conditioned, multi-task heads, BCE per head,
frozen during RL. MovieLens has no click/cart/order, so the heads are the feedback the logs do
carry, from shallow to deep engagement:

* ``watch`` — the user rated the movie at all (positive) vs. a sampled movie they did not;
* ``like``  — they rated it ≥ 4;
* ``love``  — they rated it 5.

Architecture (DIN-like, small): the candidate attends over the user's recent history (target
attention), and ``[candidate; attended history; candidate ⊙ history; scenario; profile]`` goes
through a shared MLP into one logit per head. The ranker sees the same rows (history, scenario,
trigger) as the generator, so its predictions are conditioned on exactly the request context.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics.classification import BinaryAUROC

from nestrec.data.datamodule import TensorDictDataset
from nestrec.data.scenarios import SCENARIO_KINDS

__all__ = ["HEADS", "RankerData", "UnifiedRankerModule", "ranker_labels"]

HEADS = ("watch", "like", "love")


def ranker_labels(rating: torch.Tensor) -> torch.Tensor:
    """``[N, 3]`` float labels of a positive (rated) row; NaN ratings count as watched only."""
    r = torch.nan_to_num(rating.float(), nan=0.0)
    return torch.stack([torch.ones_like(r), (r >= 4).float(), (r >= 5).float()], -1)


class UnifiedRankerModule(pl.LightningModule):
    def __init__(
        self,
        num_items: int,
        num_genres: int,
        profile_sizes: list[int],
        recent_len: int = 20,
        dim: int = 32,
        hidden: int = 64,
        lr: float = 3e-3,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.item = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.scenario = nn.Embedding(len(SCENARIO_KINDS), dim)
        self.trigger_genre = nn.Embedding(num_genres + 1, dim)
        self.profile = nn.ModuleList(nn.Embedding(size + 1, dim) for size in profile_sizes)
        self.mlp = nn.Sequential(
            nn.Linear(6 * dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.GELU()
        )
        self.heads = nn.Linear(hidden, len(HEADS))
        self.auc = nn.ModuleList(BinaryAUROC() for _ in HEADS)

    # -- scoring --------------------------------------------------------------------------------------
    def logits(self, batch: dict[str, torch.Tensor], items: torch.Tensor) -> torch.Tensor:
        """Head logits ``[B, G, heads]`` of candidate ``items [B, G]`` in each row's context."""
        recent = batch["history"][:, -self.hparams.recent_len :]
        h = self.item(recent)  # [B, T, d]
        c = self.item(items)  # [B, G, d]
        attention = (c @ h.transpose(1, 2)) / h.shape[-1] ** 0.5  # [B, G, T]
        attention = attention.masked_fill((recent == 0).unsqueeze(1), float("-inf"))
        weights = torch.nan_to_num(torch.softmax(attention, -1))  # all-padding history → zeros
        pooled = weights @ h  # [B, G, d]
        context = self.scenario(batch["scenario"]) + self.item(batch["trigger_item"].clamp(min=0))
        context = context + self.trigger_genre(batch["trigger_genre"].clamp(min=-1) + 1)
        profile = sum(
            (table(batch["profile"][:, i]) for i, table in enumerate(self.profile)),
            torch.zeros_like(context),
        )
        g = items.shape[1]
        x = torch.cat(
            [
                c,
                pooled,
                c * pooled,
                h.mean(1, keepdim=True).expand(-1, g, -1),
                context.unsqueeze(1).expand(-1, g, -1),
                profile.unsqueeze(1).expand(-1, g, -1),
            ],
            -1,
        )
        return self.heads(self.mlp(x))

    @torch.no_grad()
    def predict(self, batch: dict[str, torch.Tensor], items: torch.Tensor) -> dict[str, torch.Tensor]:
        """Head probabilities ``{head: [B, G]}``; padding items (0) get 0."""
        probs = torch.sigmoid(self.logits(batch, items)) * (items > 0).unsqueeze(-1)
        return {name: probs[..., i] for i, name in enumerate(HEADS)}

    # -- training -------------------------------------------------------------------------------------
    def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(batch, batch["items"])  # [B, 1 + negatives, heads]
        return F.binary_cross_entropy_with_logits(logits, batch["labels"]), logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["items"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits = self._loss(batch)
        self.log("val/loss", loss, batch_size=len(batch["items"]))
        for i, metric in enumerate(self.auc):
            metric.update(logits[..., i].flatten(), batch["labels"][..., i].flatten().long())

    def on_validation_epoch_end(self) -> None:
        for name, metric in zip(HEADS, self.auc):
            self.log(f"val/auc_{name}", metric.compute())
            metric.reset()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class RankerData(pl.LightningDataModule):
    """Ranker rows from an OxygenDataModule: each row's target (labels from its rating) + negatives.

    Negatives are uniform catalogue items (re-drawn each epoch from ``seed + epoch``): the
    ``watch`` head learns "would this user pick this movie here at all", ``like``/``love`` how
    well it would land. Validation uses the validation rows with the same construction.
    """

    def __init__(self, oxygen, negatives: int = 4, batch_size: int = 512, seed: int = 0):
        super().__init__()
        self.oxygen, self.negatives, self.batch_size, self.seed = oxygen, negatives, batch_size, seed

    def _rows(self, name: str, seed: int) -> dict[str, torch.Tensor]:
        t = self.oxygen._tensors["train_pairs" if name == "train" else name]
        n = len(t["target"])
        g = torch.Generator().manual_seed(seed)
        negatives = torch.randint(1, self.oxygen.num_items + 1, (n, self.negatives), generator=g)
        labels = torch.cat(
            [ranker_labels(t["rating"]).unsqueeze(1), torch.zeros(n, self.negatives, len(HEADS))], 1
        )
        keys = ("history", "scenario", "trigger_item", "trigger_genre", "profile")
        return {
            **{k: t[k] for k in keys},
            "items": torch.cat([t["target"].unsqueeze(1), negatives], 1),
            "labels": labels,
        }

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer else 0
        rows = self._rows("train", self.seed + epoch)
        return DataLoader(TensorDictDataset(rows), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDictDataset(self._rows("valid", self.seed + 10_000)), batch_size=1024)
