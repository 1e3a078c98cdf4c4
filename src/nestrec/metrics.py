"""Full-ranking top-K metrics (HR@K, NDCG@K, MRR) per scenario, exact under data parallelism.

With one relevant item per query, HR@K and NDCG@K depend only on the target's rank, so the metric
stores one integer per query instead of a score per (query, item) as torchmetrics' generic
retrieval metrics do (24k queries × 3.7k items on ML-1M). It is a torchmetrics ``Metric``, so
torchmetrics does the cross-rank gather; each row carries its sample index, and rows duplicated by
a padding ``DistributedSampler`` are counted once. ``tests/test_metrics.py`` checks the numbers
against ``torchmetrics.functional.retrieval``.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

__all__ = ["RankingMetrics", "target_ranks"]


def target_ranks(
    scores: torch.Tensor, targets: torch.Tensor, candidate_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """0-based rank of each target among the allowed candidates (number of candidates scored higher).

    ``scores``: ``[B, num_items + 1]``; column 0 (padding) is never a candidate. ``candidate_mask``
    (bool, same shape) removes items a scenario cannot show. Ties count in the target's favour,
    which only matters for exactly equal float scores.
    """
    scores = scores.float().clone()
    scores[:, 0] = float("-inf")
    if candidate_mask is not None:
        scores = scores.masked_fill(~candidate_mask, float("-inf"))
    target_scores = scores.gather(1, targets.view(-1, 1))
    return (scores > target_scores).sum(dim=1)


class RankingMetrics(Metric):
    """Accumulates (sample index, scenario, rank) and reports HR/NDCG@K and MRR per scenario."""

    full_state_update = False
    higher_is_better = True

    def __init__(
        self, ks: tuple[int, ...] = (1, 5, 10, 20, 50), scenario_names: tuple[str, ...] = ("homepage",)
    ):
        super().__init__()
        self.ks = tuple(int(k) for k in ks)
        self.scenario_names = tuple(scenario_names)
        self.add_state("index", default=[], dist_reduce_fx="cat")
        self.add_state("scenario", default=[], dist_reduce_fx="cat")
        self.add_state("rank", default=[], dist_reduce_fx="cat")

    def update(self, ranks: torch.Tensor, scenario: torch.Tensor, index: torch.Tensor) -> None:
        self.rank.append(ranks.detach().long())
        self.scenario.append(scenario.detach().long())
        self.index.append(index.detach().long())

    def compute(self) -> dict[str, torch.Tensor]:
        def cat(state):
            return torch.cat(state) if isinstance(state, list) else state

        index, scenario, rank = cat(self.index), cat(self.scenario), cat(self.rank)
        if index.numel() == 0:
            return {}
        order = torch.argsort(index, stable=True)
        index, scenario, rank = index[order], scenario[order], rank[order]
        first = torch.ones_like(index, dtype=torch.bool)
        first[1:] = index[1:] != index[:-1]
        scenario, rank = scenario[first], rank[first].double()

        results: dict[str, torch.Tensor] = {}
        groups = [("overall", torch.ones_like(scenario, dtype=torch.bool))]
        if len(set(scenario.tolist())) > 1 or len(self.scenario_names) > 1:
            groups += [
                (name, scenario == i) for i, name in enumerate(self.scenario_names) if (scenario == i).any()
            ]
        for name, mask in groups:
            r = rank[mask]
            for k in self.ks:
                hit = (r < k).double()
                results[f"{name}/hr@{k}"] = hit.mean()
                # One held-out item per row: Recall@K (relevant items found / relevant items) = HR@K.
                results[f"{name}/recall@{k}"] = hit.mean()
                results[f"{name}/ndcg@{k}"] = (hit / torch.log2(r + 2.0)).mean()
            results[f"{name}/mrr"] = (1.0 / (r + 1.0)).mean()
            results[f"{name}/count"] = torch.tensor(float(mask.sum()))
        return results
