"""The shared evaluation harness: any model that scores the catalogue is evaluated the same way.

A model subclasses :class:`NextItemRecommender` and implements ``score_items(batch)``; validation
and test then rank the target among every allowed candidate (the full catalogue, or a genre's
items in a ``channel`` scenario), optionally excluding the user's history, and log
``{stage}/{scenario}/{hr,ndcg}@K`` plus the ``{stage}/hr@K`` / ``{stage}/ndcg@K`` shortcuts of the
``overall`` group. Keeping this in one place is what makes baseline-vs-OxygenREC comparisons fair.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from nestrec.data.scenarios import SCENARIO_KINDS
from nestrec.metrics import RankingMetrics, target_ranks

__all__ = ["NextItemRecommender"]


class NextItemRecommender(pl.LightningModule):
    """Base LightningModule with full-ranking validation/test over derived scenarios."""

    def __init__(
        self,
        num_items: int,
        genre_item_mask: torch.Tensor | None = None,
        ks: tuple[int, ...] = (1, 5, 10, 20, 50),
        exclude_history: bool = False,
    ):
        super().__init__()
        self.num_items = num_items
        self.exclude_history = exclude_history
        mask = (
            genre_item_mask
            if genre_item_mask is not None
            else torch.zeros(0, num_items + 1, dtype=torch.bool)
        )
        # Derived from the data each run, so it is not part of the checkpointed state.
        self.register_buffer("genre_item_mask", mask.bool(), persistent=False)
        self.val_metrics = RankingMetrics(tuple(ks), SCENARIO_KINDS)
        self.test_metrics = RankingMetrics(tuple(ks), SCENARIO_KINDS)

    def score_items(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores ``[B, num_items + 1]`` for the next item after ``batch['history']``."""
        raise NotImplementedError

    def candidate_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        genre = batch.get("trigger_genre")
        has_channel = genre is not None and bool((genre >= 0).any()) and self.genre_item_mask.numel() > 0
        if not has_channel and not self.exclude_history:
            return None
        mask = torch.ones(len(batch["target"]), self.num_items + 1, dtype=torch.bool, device=self.device)
        if has_channel:
            rows = genre >= 0
            mask[rows] = self.genre_item_mask[genre[rows]]
        if self.exclude_history:
            mask.scatter_(1, batch["history"], False)
            mask.scatter_(1, batch["target"].view(-1, 1), True)
        return mask

    def _evaluate(self, batch: dict[str, torch.Tensor], metrics: RankingMetrics) -> None:
        scores = self.score_items(batch)
        ranks = target_ranks(scores, batch["target"], self.candidate_mask(batch))
        metrics.update(ranks, batch["scenario"], batch["index"])

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def _log_metrics(self, stage: str, metrics: RankingMetrics) -> None:
        values = metrics.compute()
        metrics.reset()
        logged = {}
        for key, value in values.items():
            logged[f"{stage}/{key}"] = value.float()
            if key.startswith("overall/") and not key.endswith("/count"):
                logged[f"{stage}/{key.split('/', 1)[1]}"] = value.float()
        # compute() already gathered across ranks, so no further sync is needed.
        headline = {k: logged.pop(k) for k in (f"{stage}/hr@10", f"{stage}/ndcg@10") if k in logged}
        self.log_dict(logged, sync_dist=False, prog_bar=False)
        self.log_dict(headline, sync_dist=False, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)
