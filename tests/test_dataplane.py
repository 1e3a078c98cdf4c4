"""The shared data plane in one process: fused collectives, accumulation, pooling, id checks.

The multi-process exactness of every schedule is in ``test_sharded_equivalence.py`` and
``test_pipeline_equivalence.py``; these tests pin what one process can show.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nestrec.embedding import EmbeddingTableConfig
from nestrec.errors import UserInputError
from nestrec.sharding import RowWiseAdagrad, ShardedEmbeddingCollection, dataplane
from nestrec.sparse import JaggedFeatures

TABLES = [
    EmbeddingTableConfig("a", num_rows=11, dim=3, features=("a1", "a2"), pooling="sum"),
    EmbeddingTableConfig("b", num_rows=7, dim=5, features=("b",), pooling="mean"),
    EmbeddingTableConfig("c", num_rows=5, dim=2, features=("c",), pooling="none"),
]


def _features(seed: int) -> JaggedFeatures:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for table in TABLES:
        for feature in table.features:
            lengths = torch.randint(0, 4, (6,), generator=g)  # empty bags included
            if table.pooling == "none":
                lengths = torch.ones(6, dtype=torch.long)
            ids = torch.randint(0, table.num_rows, (int(lengths.sum()),), generator=g)
            out[feature] = (ids, lengths)
    return JaggedFeatures.from_dict(out)


def _dense_lookup(features: JaggedFeatures, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What plain dense tables and pooling give (differentiable in ``weights``)."""
    by_feature = {f: t for t in TABLES for f in t.features}
    out = {}
    for feature, (ids, lengths) in features.split().items():
        table = by_feature[feature]
        rows = weights[table.name][ids]
        if table.pooling == "none":
            out[feature] = rows
            continue
        segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        pooled = torch.zeros(len(lengths), table.dim, dtype=rows.dtype).index_add(0, segment, rows)
        if table.pooling == "mean":
            pooled = pooled / lengths.clamp(min=1).unsqueeze(1).to(rows.dtype)
        out[feature] = pooled
    return out


def _collection() -> ShardedEmbeddingCollection:
    return ShardedEmbeddingCollection(
        TABLES, optimizer=RowWiseAdagrad(lr=0.3), dtype=torch.float64, init_std=0.5
    )


def test_lookup_pools_every_mode_like_dense_tables():
    tables = _collection()
    features = _features(0)
    with torch.no_grad():
        pooled = tables(features)
    expected = _dense_lookup(features, {t.name: tables.gather_full(t.name) for t in TABLES})
    assert pooled.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(pooled[name], expected[name], rtol=0, atol=1e-12)


def test_two_lookups_before_one_update_apply_the_summed_gradient_once():
    """Accumulation: Adagrad's state makes 'once with the sum' differ from 'twice' (the control)."""
    first, second = _features(1), _features(2)

    def loss(pooled):
        return sum((v * torch.arange(v.numel(), dtype=v.dtype).view_as(v)).sum() for v in pooled.values())

    tables = _collection()
    (loss(tables(first)) + loss(tables(second))).backward()
    tables.apply_sparse_updates()

    dense = {t.name: nn.Parameter(_collection().gather_full(t.name)) for t in TABLES}
    reference = torch.optim.Adagrad(dense.values(), lr=0.3)
    (loss(_dense_lookup(first, dense)) + loss(_dense_lookup(second, dense))).backward()
    reference.step()
    for t in TABLES:
        torch.testing.assert_close(tables.gather_full(t.name), dense[t.name].detach(), rtol=0, atol=1e-12)

    # Negative control: an update after each lookup moves the shared rows differently.
    twice = _collection()
    for features in (first, second):
        loss(twice(features)).backward()
        twice.apply_sparse_updates()
    assert max((twice.gather_full(t.name) - tables.gather_full(t.name)).abs().max() for t in TABLES) > 1e-3


def test_a_lookup_and_its_update_are_four_collectives_whatever_the_table_count(monkeypatch):
    calls: list[str] = []
    real_counts, real_a2a = dataplane.exchange_counts, dataplane.all_to_all_uneven

    def counts(*args, **kwargs):
        calls.append("counts")
        return real_counts(*args, **kwargs)

    def a2a(tensor, send, recv, group=None, channel="a2a"):
        calls.append(channel)
        return real_a2a(tensor, send, recv, group, channel)

    monkeypatch.setattr(dataplane, "exchange_counts", counts)
    monkeypatch.setattr(dataplane, "all_to_all_uneven", a2a)
    tables = _collection()
    sum(v.sum() for v in tables(_features(3)).values()).backward()
    tables.apply_sparse_updates()
    assert calls == ["counts", "keys", "rows", "grads"]


def test_an_id_outside_its_table_is_one_line_naming_feature_table_and_id():
    tables = _collection()
    bad = JaggedFeatures.from_dict(
        {"a1": (torch.tensor([1, 2]), torch.tensor([2])), "b": (torch.tensor([7]), torch.tensor([1]))}
    )
    with pytest.raises(UserInputError, match=r"^feature 'b': id 7 is outside table 'b' rows \[0, 7\)$"):
        tables(bad)


@pytest.mark.parametrize("sharding", ["range", "cyclic"])
def test_tables_smaller_than_the_world_shard_on_every_rank(sharding):
    """A 2-row table over 4 ranks: the last ranks hold empty shards (cyclic used to crash)."""
    small = [EmbeddingTableConfig("gender", num_rows=2, dim=4)]
    sizes = []
    for rank in range(4):
        tables = ShardedEmbeddingCollection(small, sharding=sharding)
        tables.shard(rank, 4)
        sizes.append(tables.stores["gender"].num_rows)
    assert sizes == [1, 1, 0, 0]


def test_pooling_backward_passes_gradcheck_in_every_mode():
    tables = _collection()
    route = dataplane.route_keys(tables, [_features(5)])
    for bag in route.micro[0].features:
        spec = TABLES[bag.table]
        unique = torch.randn(
            int(bag.slots.max()) + 1 if bag.slots.numel() else 1, spec.dim, dtype=torch.float64
        )
        unique.requires_grad_(True)
        torch.autograd.gradcheck(lambda r, b=bag: dataplane._BagLookup.apply(r, b), (unique,))


def test_a_table_that_only_fits_sharded_is_never_built_whole():
    """2e9 rows x 64 would be 512 GB: construction allocates nothing; a rank builds only its shard."""
    huge = ShardedEmbeddingCollection([EmbeddingTableConfig("huge", num_rows=2_000_000_000, dim=64)])
    huge.shard(99_999, 100_000)
    assert huge.stores["huge"].num_rows == 20_000
    assert huge.stores["huge"].weight.shape == (20_000, 64)


def _bad_id_worker(rank: int, init_file: str, out_dir: str) -> None:
    import json
    from pathlib import Path

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        tables = _collection()
        tables.shard(rank, 2, dist.new_group(backend="gloo"), dist.new_group(backend="gloo"))
        features = _features(rank)
        if rank == 1:  # only rank 1's batch is bad: table a has 11 rows
            features = JaggedFeatures.from_dict({"a1": (torch.tensor([3, 11]), torch.tensor([2]))})
        try:
            tables(features)
            outcome = "no error"
        except UserInputError as err:
            outcome = str(err)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(outcome))
    finally:
        dist.destroy_process_group()


def test_a_bad_id_on_one_rank_stops_every_rank_instead_of_hanging(tmp_path):
    import json
    import time

    import torch.multiprocessing as mp

    start = time.monotonic()
    mp.spawn(_bad_id_worker, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    assert time.monotonic() - start < 60
    own = json.loads((tmp_path / "rank1.json").read_text())
    peer = json.loads((tmp_path / "rank0.json").read_text())
    assert own == "feature 'a1': id 11 is outside table 'a' rows [0, 11)"
    assert peer.startswith("rank(s) 1 received invalid sparse features")
