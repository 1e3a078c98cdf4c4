"""Sharded checkpoints: reshard between world sizes and rules; bad checkpoints fail cleanly."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.multiprocessing as mp

from nestrec.checkpoint import CheckpointError, load_shards, save_shards
from nestrec.sharding import ShardedEmbeddingCollection
from sharded_reference import TABLES, checkpoint_worker, row_optimizer


def _spawn(tmp_path, world, sharding, mode, tag):
    mp.spawn(
        checkpoint_worker,
        args=(world, sharding, str(tmp_path / f"pg-{tag}"), str(tmp_path / "ckpt"), mode),
        nprocs=world,
        join=True,
    )


@pytest.mark.parametrize("saved_world,loaded_world,sharding", [(2, 3, "cyclic"), (4, 2, "range")])
def test_reshard_between_world_sizes(tmp_path, saved_world, loaded_world, sharding):
    _spawn(tmp_path, saved_world, "range", "save", "save")
    _spawn(tmp_path, loaded_world, sharding, "load", "load")
    saved = torch.load(tmp_path / "full-saved.pt")
    loaded = torch.load(tmp_path / f"full-loaded-{loaded_world}-{sharding}.pt")
    assert saved.keys() == loaded.keys()
    for key in saved:
        assert torch.equal(saved[key], loaded[key]), key
    assert saved["item.state.exp_avg"].abs().sum() > 0  # optimizer state really travelled
    _check_consolidation(tmp_path, saved)


def _check_consolidation(tmp_path, saved):
    """``python -m nestrec.checkpoint CKPT OUT``: the multi-rank checkpoint as one plain file,
    equal to the tables the ranks held; a corrupted shard is one line and writes nothing."""
    from nestrec.checkpoint.__main__ import main as consolidate_main

    out = tmp_path / "plain.pt"
    assert consolidate_main([str(tmp_path / "ckpt"), str(out)]) == 0
    plain = torch.load(out, weights_only=False)
    assert plain["note"] == "meta"  # Lightning's dict is kept
    [tables] = plain["sharded_tables"]
    for key, value in saved.items():
        if key == "steps":
            assert [tables[t.name]["step"] for t in TABLES] == value.tolist()
            continue
        name, what = key.split(".", 1)
        assert torch.equal(tables[name][what], value), key
    shard = sorted((tmp_path / "ckpt").glob("shard-*.pt"))[-1]
    shard.write_bytes(shard.read_bytes()[:-8] + b"xxxxxxxx")
    assert consolidate_main([str(tmp_path / "ckpt"), str(tmp_path / "bad.pt")]) == 2
    assert not (tmp_path / "bad.pt").exists()


def _saved_checkpoint(tmp_path):
    tables = ShardedEmbeddingCollection(TABLES, optimizer=row_optimizer("adagrad"), dtype=torch.float64)
    path = save_shards(tmp_path / "ck.ckpt", {"epoch": 1}, [tables], 0, 1, lambda: None)
    return path


def _fresh():
    tables = ShardedEmbeddingCollection(
        TABLES, optimizer=row_optimizer("adagrad"), dtype=torch.float64, seed=99
    )
    return tables, {t.name: tables.stores[t.name].weight.clone() for t in TABLES}


def _unchanged(tables, before):
    return all(torch.equal(tables.stores[name].weight, value) for name, value in before.items())


def test_missing_truncated_and_foreign_shards_fail_and_change_nothing(tmp_path):
    path = _saved_checkpoint(tmp_path)
    tables, before = _fresh()
    assert load_shards(path, [tables])["epoch"] == 1 and not _unchanged(tables, before)

    shard = next(path.glob("shard-*.pt"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    tables, before = _fresh()
    with pytest.raises(CheckpointError, match="truncated or altered"):
        load_shards(path, [tables])
    assert _unchanged(tables, before)

    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_shards(path, [tables])
    shard.unlink()
    with pytest.raises(CheckpointError, match="shard shard-00000-of-00001.pt of 1 is missing"):
        load_shards(path, [tables])
    assert _unchanged(tables, before)

    path = _saved_checkpoint(tmp_path / "again")
    other = ShardedEmbeddingCollection([TABLES[0]], optimizer=row_optimizer("adagrad"), dtype=torch.float64)
    with pytest.raises(CheckpointError, match="do not match the model"):
        load_shards(path, [other])
    sgd = ShardedEmbeddingCollection(TABLES, optimizer=row_optimizer("sgd"), dtype=torch.float64)
    with pytest.raises(CheckpointError, match="sparse optimizer state"):
        load_shards(path, [sgd])
    with pytest.raises(CheckpointError, match="does not exist"):
        load_shards(tmp_path / "nope", [tables])


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = _saved_checkpoint(tmp_path)
    tables = ShardedEmbeddingCollection(TABLES, optimizer=row_optimizer("adagrad"), dtype=torch.float64)

    def failing_barrier():
        raise RuntimeError("rank 1 died")

    with pytest.raises(RuntimeError, match="rank 1 died"):
        save_shards(path, {"epoch": 2}, [tables], 0, 1, failing_barrier)
    fresh, _ = _fresh()
    assert load_shards(path, [fresh])["epoch"] == 1
    shutil.rmtree(path.with_name(path.name + ".partial"), ignore_errors=True)
