"""Key-centric clustering: a valid equal-size partition, deterministic, and it ships fewer ids."""

from __future__ import annotations

import pytest
import torch

from nestrec.errors import ConfigError
from nestrec.pipeline import cluster_samples, sample_keys
from nestrec.sparse import JaggedFeatures


def _zipf_batch(batch=256, vocab=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** 1.1
    lengths = torch.randint(1, 12, (batch,), generator=g)
    history = torch.multinomial(probs, int(lengths.sum()), replacement=True, generator=g)
    items = torch.multinomial(probs, batch, replacement=True, generator=g)
    users = torch.randint(0, 50, (batch,), generator=g)
    return JaggedFeatures.from_dict(
        {
            "user": (users, torch.ones(batch, dtype=torch.long)),
            "item": (items, torch.ones(batch, dtype=torch.long)),
            "history": (history, lengths),
        }
    )


@pytest.mark.parametrize("method", ["none", "signature", "greedy"])
def test_partition_is_a_permutation_with_equal_sizes(method):
    keys = sample_keys(_zipf_batch(batch=103), {"item": "item", "history": "item", "user": "user"})
    plan = cluster_samples(keys, 4, method)
    assert sorted(plan.permutation.tolist()) == list(range(103))
    sizes = [len(mb) for mb in plan.micro_batches()]
    assert sizes == [26, 26, 26, 25]
    again = cluster_samples(keys, 4, method)
    assert torch.equal(plan.permutation, again.permutation)


def test_clustering_ships_fewer_unique_ids_than_random_splits():
    keys = sample_keys(_zipf_batch(), {"item": "item", "history": "item", "user": "user"})
    g = torch.Generator().manual_seed(1)
    random_totals = []
    for _ in range(5):
        perm = torch.randperm(len(keys), generator=g)
        plan = cluster_samples([keys[i] for i in perm.tolist()], 8, "none")
        random_totals.append(sum(plan.unique_keys([keys[i] for i in perm.tolist()])))
    signature = sum(cluster_samples(keys, 8, "signature").unique_keys(keys))
    greedy = sum(cluster_samples(keys, 8, "greedy").unique_keys(keys))
    assert signature < min(random_totals) and greedy < min(random_totals), (signature, greedy, random_totals)


def test_bad_arguments():
    keys = [[1], [2], [3]]
    with pytest.raises(ConfigError, match="unknown clustering 'kmeans'"):
        cluster_samples(keys, 2, "kmeans")
    with pytest.raises(ConfigError, match="cannot split a batch into 0 micro-batches"):
        cluster_samples(keys, 0)


@pytest.mark.parametrize("method", ["none", "signature", "greedy"])
def test_batch_smaller_than_micro_batch_count_gets_empty_micro_batches(method):
    # Every rank must issue N collectives even when its last batch has fewer than N samples.
    plan = cluster_samples([[1], [2], [1]], 5, method)
    sizes = [len(mb) for mb in plan.micro_batches()]
    assert sizes == [1, 1, 1, 0, 0]
    assert sorted(plan.permutation.tolist()) == [0, 1, 2]
