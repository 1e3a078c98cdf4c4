"""Ranking metrics agree with torchmetrics' retrieval metrics and are exact under sampler padding."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.functional.retrieval import retrieval_hit_rate, retrieval_normalized_dcg

from nestrec.metrics import RankingMetrics, target_ranks


def test_target_ranks_brute_force():
    torch.manual_seed(0)
    scores = torch.randn(50, 31)
    targets = torch.randint(1, 31, (50,))
    mask = torch.rand(50, 31) > 0.3
    mask[torch.arange(50), targets] = True
    ranks = target_ranks(scores, targets, mask)
    for row in range(50):
        allowed = [j for j in range(1, 31) if mask[row, j]]
        expected = sum(scores[row, j] > scores[row, targets[row]] for j in allowed)
        assert ranks[row] == expected


def test_matches_torchmetrics_retrieval():
    torch.manual_seed(1)
    scores = torch.randn(200, 101)
    targets = torch.randint(1, 101, (200,))
    scenario = torch.randint(0, 2, (200,))
    metric = RankingMetrics(ks=(1, 5, 10), scenario_names=("a", "b"))
    metric.update(target_ranks(scores, targets), scenario, torch.arange(200))
    result = metric.compute()
    for name, rows in (
        ("overall", torch.ones(200, dtype=torch.bool)),
        ("a", scenario == 0),
        ("b", scenario == 1),
    ):
        preds, tgts = scores[rows][:, 1:], targets[rows]
        relevance = torch.zeros_like(preds, dtype=torch.bool)
        relevance[torch.arange(len(tgts)), tgts - 1] = True
        for k in (1, 5, 10):
            hr = torch.stack([retrieval_hit_rate(p, t, top_k=k) for p, t in zip(preds, relevance)]).mean()
            ndcg = torch.stack(
                [retrieval_normalized_dcg(p, t, top_k=k) for p, t in zip(preds, relevance)]
            ).mean()
            assert result[f"{name}/hr@{k}"].item() == pytest.approx(hr.item(), abs=1e-6)
            assert result[f"{name}/ndcg@{k}"].item() == pytest.approx(ndcg.item(), abs=1e-6)
        # (torchmetrics 1.9's retrieval_reciprocal_rank returns 0 past rank ~50, so compare by sorting)
        positions = (preds.argsort(dim=1, descending=True) == (tgts - 1).view(-1, 1)).float().argmax(dim=1)
        mrr = (1.0 / (positions.double() + 1)).mean()
        assert result[f"{name}/mrr"].item() == pytest.approx(mrr.item(), abs=1e-6)


def test_duplicates_from_sampler_padding_count_once():
    ranks = torch.tensor([0, 20, 3])
    metric = RankingMetrics(ks=(10,))
    metric.update(ranks, torch.zeros(3, dtype=torch.long), torch.tensor([0, 1, 2]))
    metric.update(
        torch.tensor([0]), torch.zeros(1, dtype=torch.long), torch.tensor([0])
    )  # padded repeat of row 0
    result = metric.compute()
    assert result["overall/hr@10"].item() == pytest.approx(2 / 3)
    assert result["overall/count"].item() == 3
