"""The shared data plane in one process: fused collectives, accumulation, pooling, id checks.

The multi-process exactness of every schedule is in ``test_sharded_equivalence.py`` and
``test_pipeline_equivalence.py``; these tests pin what one process can show.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nestrec.embedding import EmbeddingTableConfig
from nestrec.errors import ConfigError, UserInputError
from nestrec.sharding import RowWiseAdagrad, RowWiseSGD, ShardedEmbeddingCollection, dataplane
from nestrec.sparse import JaggedFeatures

TABLES = [
    EmbeddingTableConfig("a", num_rows=11, dim=3, features=("a1", "a2"), pooling="sum"),
    EmbeddingTableConfig("b", num_rows=7, dim=5, features=("b",), pooling="mean"),
    EmbeddingTableConfig("c", num_rows=5, dim=2, features=("c",), pooling="none"),
]


POOLING_TABLES = TABLES[:2]  # sum and mean: what the pooled exchange serves
EXCHANGES = [("rows", TABLES), ("pooled", POOLING_TABLES)]


def _features(seed: int, tables=TABLES) -> JaggedFeatures:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for table in tables:
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


def _collection(exchange: str = "auto", tables=TABLES, optimizer=None) -> ShardedEmbeddingCollection:
    return ShardedEmbeddingCollection(
        tables,
        optimizer=optimizer or RowWiseAdagrad(lr=0.3),
        dtype=torch.float64,
        init_std=0.5,
        exchange=exchange,
    )


def _loss(pooled: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum((v * torch.arange(v.numel(), dtype=v.dtype).view_as(v)).sum() for v in pooled.values())


@pytest.mark.parametrize("exchange,tables", EXCHANGES)
def test_lookup_pools_every_mode_like_dense_tables(exchange, tables):
    collection = _collection(exchange, tables)
    assert collection.pooled_exchange == (exchange == "pooled")
    # The second batch lacks one of table a's two features: its partial sums are never read.
    without_a2 = {k: v for k, v in _features(9, tables).split().items() if k != "a2"}
    for features in (_features(0, tables), JaggedFeatures.from_dict(without_a2)):
        with torch.no_grad():
            pooled = collection(features)
        expected = _dense_lookup(features, {t.name: collection.gather_full(t.name) for t in tables})
        assert pooled.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(pooled[name], expected[name], rtol=0, atol=1e-12)


def test_auto_exchange_pools_on_the_owner_only_when_every_table_pools():
    assert _collection("auto", POOLING_TABLES).pooled_exchange
    assert not _collection("auto", TABLES).pooled_exchange
    with pytest.raises(ConfigError, match=r"^exchange='pooled' .* table\(s\) c have pooling='none'"):
        _collection("pooled", TABLES)
    with pytest.raises(ConfigError, match=r"^unknown embedding exchange 'fast'"):
        _collection("fast", TABLES)


@pytest.mark.parametrize("exchange,tables", EXCHANGES)
def test_two_lookups_before_one_update_apply_the_summed_gradient_once(exchange, tables):
    """Accumulation: Adagrad's state makes 'once with the sum' differ from 'twice' (the control)."""
    first, second = _features(1, tables), _features(2, tables)
    collection = _collection(exchange, tables)
    (_loss(collection(first)) + _loss(collection(second))).backward()
    collection.apply_sparse_updates()

    dense = {t.name: nn.Parameter(_collection(exchange, tables).gather_full(t.name)) for t in tables}
    reference = torch.optim.Adagrad(dense.values(), lr=0.3)
    (_loss(_dense_lookup(first, dense)) + _loss(_dense_lookup(second, dense))).backward()
    reference.step()
    for t in tables:
        torch.testing.assert_close(collection.gather_full(t.name), dense[t.name].detach(), rtol=0, atol=1e-12)

    # Negative control: an update after each lookup moves the shared rows differently.
    twice = _collection(exchange, tables)
    for features in (first, second):
        _loss(twice(features)).backward()
        twice.apply_sparse_updates()
    assert (
        max((twice.gather_full(t.name) - collection.gather_full(t.name)).abs().max() for t in tables) > 1e-3
    )


@pytest.mark.parametrize("exchange,tables", EXCHANGES)
def test_sgd_adds_each_gradient_straight_into_the_shard_with_dense_sgd_results(exchange, tables):
    """SGD is linear in the gradient: the lookup is fused (no owner dedup, no per-row sum) and
    still equals dense SGD, including two lookups before one update."""
    collection = _collection(exchange, tables, RowWiseSGD(lr=0.3))
    assert collection.fused_updates(1) and not collection.fused_updates(2)
    first, second = _features(3, tables), _features(4, tables)
    dense = {t.name: nn.Parameter(collection.gather_full(t.name)) for t in tables}
    reference = torch.optim.SGD(dense.values(), lr=0.3)
    for batches in ([first], [first, second]):
        sum(_loss(collection(f)) for f in batches).backward()
        collection.apply_sparse_updates()
        reference.zero_grad()
        sum(_loss(_dense_lookup(f, dense)) for f in batches).backward()
        reference.step()
    for t in tables:
        torch.testing.assert_close(collection.gather_full(t.name), dense[t.name].detach(), rtol=0, atol=1e-12)
        assert collection.stores[t.name].step == 2
    assert (dense["a"].detach() - _collection(exchange, tables).gather_full("a")).abs().max() > 1e-3


@pytest.mark.parametrize("sharding", ["range", "cyclic"])
def test_every_key_finds_its_owner_and_slot_with_empty_shards(sharding):
    """The flat key space's owner lookup against the sharding rule, tables smaller than the world."""
    small = [EmbeddingTableConfig(name, num_rows=n, dim=2) for name, n in (("x", 2), ("y", 5), ("z", 9))]
    for rank in range(4):
        collection = ShardedEmbeddingCollection(small, sharding=sharding)
        collection.shard(rank, 4)
        space = collection.key_space
        for t, table in enumerate(small):
            ids = torch.arange(table.num_rows)
            rule = collection.rules[table.name]
            owner, slot = space.owner_slot(ids + space.offsets[t], torch.full_like(ids, t))
            assert owner.tolist() == rule.owner(ids).tolist()
            assert slot.tolist() == (space.local_offsets[owner, t] + rule.local_index(ids)).tolist()


@pytest.mark.parametrize("exchange,tables", EXCHANGES)
def test_a_lookup_and_its_update_are_four_collectives_whatever_the_table_count(monkeypatch, exchange, tables):
    calls: list[str] = []
    real_counts, real_a2a = dataplane.start_exchange_counts, dataplane.start_all_to_all_uneven

    def counts(*args, **kwargs):
        calls.append("counts")
        return real_counts(*args, **kwargs)

    def a2a(tensor, send, recv, group=None, channel="a2a"):
        calls.append(channel)
        return real_a2a(tensor, send, recv, group, channel)

    monkeypatch.setattr(dataplane, "start_exchange_counts", counts)
    monkeypatch.setattr(dataplane, "start_all_to_all_uneven", a2a)
    collection = _collection(exchange, tables)
    sum(v.sum() for v in collection(_features(3, tables)).values()).backward()
    collection.apply_sparse_updates()
    assert calls == ["counts", "keys", "rows", "grads"]


def test_an_id_outside_its_table_is_one_line_naming_feature_table_and_id():
    tables = _collection()
    bad = JaggedFeatures.from_dict(
        {"a1": (torch.tensor([1, 2]), torch.tensor([2])), "b": (torch.tensor([7]), torch.tensor([1]))}
    )
    with pytest.raises(UserInputError, match=r"^feature 'b': id 7 is outside table 'b' rows \[0, 7\)$"):
        tables(bad)


def test_a_feature_given_twice_is_one_line_not_a_silent_mix_of_bags():
    ids, lengths = torch.tensor([1, 2, 3]), torch.tensor([1, 1, 0, 1, 0, 0])
    twice = JaggedFeatures(["a1", "a1"], ids, lengths)
    for exchange, tables in EXCHANGES:
        with pytest.raises(
            UserInputError, match=r"^feature 'a1' appears twice in one batch's sparse features$"
        ):
            _collection(exchange, tables)(twice)


def test_only_plain_sgd_is_fused():
    class DecayedSGD(RowWiseSGD):
        def update_in_place(self, weight, state, index, grad, step):
            weight.mul_(0.99)
            super().update_in_place(weight, state, index, grad, step)

    assert RowWiseSGD(lr=0.1).gradient_multiplier() == -0.1
    assert DecayedSGD(lr=0.1).gradient_multiplier() is None
    assert RowWiseAdagrad().gradient_multiplier() is None
    assert not _collection("auto", POOLING_TABLES, DecayedSGD(lr=0.1)).fused_updates(1)


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
