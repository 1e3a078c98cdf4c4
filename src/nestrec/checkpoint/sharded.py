"""Save and load the tables of ``ShardedEmbeddingCollection``s as one directory per checkpoint.

Layout of ``<name>.ckpt/`` (a directory, as Lightning's ``ModelParallelStrategy`` does)::

    meta.pt                  the ordinary Lightning checkpoint dict (dense weights, optimizers, loops)
    manifest.json            world size, sharding rules, table shapes, file sizes and SHA-256 digests
    shard-00000-of-00002.pt  rank 0's rows of every table: global row ids, weights, optimizer state

Saving writes into a temporary sibling directory and renames it into place only after every rank
has written and rank 0 has checked the files, so a crash never leaves a torn checkpoint and an
older checkpoint at the same path survives until the new one is complete.

Loading checks the manifest against the model (table names and shapes) and every file's size and
digest *before* touching any table, so a missing, truncated or foreign shard fails with one
message and changes nothing. Each shard file lists the global ids of its rows, so a checkpoint
written by W ranks loads into any other world size or sharding rule: every rank reads the rows it
owns under the new rule.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from nestrec.errors import UserInputError
from nestrec.fileio import sha256_file

__all__ = [
    "CheckpointError",
    "consolidate",
    "is_sharded_checkpoint",
    "save_shards",
    "load_shards",
    "META_FILE",
    "MANIFEST_FILE",
]

META_FILE = "meta.pt"
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(UserInputError):
    """A sharded checkpoint is missing, incomplete, corrupted or does not fit the model."""


def is_sharded_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / MANIFEST_FILE).exists()


def _shard_name(rank: int, world_size: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}.pt"


def _collection_key(index: int) -> str:
    return f"collection{index}"


def save_shards(
    path: str | Path,
    checkpoint: dict,
    collections: list,
    rank: int,
    world_size: int,
    barrier: Callable[[], None],
) -> Path:
    """Write ``checkpoint`` (rank 0) and every rank's table shards to the directory ``path``."""
    final = Path(path)
    staging = final.with_name(final.name + ".partial")
    if rank == 0:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    barrier()
    shard = {_collection_key(i): c.local_state() for i, c in enumerate(collections)}
    shard_file = staging / _shard_name(rank, world_size)
    torch.save(shard, shard_file)
    barrier()
    if rank == 0:
        torch.save(checkpoint, staging / META_FILE)
        files = {}
        for r in range(world_size):
            f = staging / _shard_name(r, world_size)
            files[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
        manifest = {
            "format_version": FORMAT_VERSION,
            "world_size": world_size,
            "collections": [
                {
                    "sharding": c.sharding_mode,
                    "tables": {t.name: {"num_rows": t.num_rows, "dim": t.dim} for t in c.tables},
                    "optimizer_state": sorted(next(iter(c.stores.values())).state) if c.stores else [],
                }
                for c in collections
            ],
            "files": files,
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
        # Swap into place: the old checkpoint (if any) is removed only once the new one is whole.
        previous = final.with_name(final.name + ".previous")
        if final.exists():
            if previous.exists():
                shutil.rmtree(previous) if previous.is_dir() else previous.unlink()
            os.replace(final, previous)
        os.replace(staging, final)
        if previous.exists():
            shutil.rmtree(previous) if previous.is_dir() else previous.unlink()
    barrier()
    return final


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    manifest_file = path / MANIFEST_FILE
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not manifest_file.exists():
        raise CheckpointError(f"{path} is not a nestrec sharded checkpoint (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(manifest_file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_file}: not valid JSON ({err.msg})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{manifest_file}: format version {manifest.get('format_version')} is not {FORMAT_VERSION}"
        )
    return manifest


def verify(path: str | Path, collections: list) -> dict:
    """Check the manifest against the model and every file against the manifest; no side effects."""
    path = Path(path)
    manifest = read_manifest(path)
    if not (path / META_FILE).exists():
        raise CheckpointError(f"{path}: {META_FILE} is missing")
    if len(manifest["collections"]) != len(collections):
        raise CheckpointError(
            f"{path}: holds {len(manifest['collections'])} sharded collections, the model has {len(collections)}"
        )
    for i, (saved, collection) in enumerate(zip(manifest["collections"], collections)):
        model_tables = {t.name: {"num_rows": t.num_rows, "dim": t.dim} for t in collection.tables}
        if saved["tables"] != model_tables:
            raise CheckpointError(
                f"{path}: collection {i} tables {saved['tables']} do not match the model's {model_tables}"
            )
        wanted = sorted(next(iter(collection.stores.values())).state) if collection.stores else []
        if saved.get("optimizer_state", []) != wanted:
            raise CheckpointError(
                f"{path}: sparse optimizer state {saved.get('optimizer_state')} does not match the model's {wanted}"
            )
    _verify_files(path, manifest)
    return manifest


def _verify_files(path: Path, manifest: dict) -> None:
    world = manifest["world_size"]
    for r in range(world):
        name = _shard_name(r, world)
        f = path / name
        expected = manifest["files"].get(name)
        if expected is None or not f.exists():
            raise CheckpointError(f"{path}: shard {name} of {world} is missing")
        if f.stat().st_size != expected["bytes"]:
            raise CheckpointError(
                f"{path}: shard {name} is truncated or altered ({f.stat().st_size} bytes, expected {expected['bytes']})"
            )
        if sha256_file(f) != expected["sha256"]:
            raise CheckpointError(f"{path}: shard {name} is corrupted (SHA-256 mismatch)")


def consolidate(path: str | Path) -> dict:
    """A sharded checkpoint as one plain dict, without the model: Lightning's ``meta.pt`` dict plus
    ``sharded_tables`` — per collection, per table, the whole ``weight``, every optimizer-state
    tensor (``state.<name>``) and the ``step`` — assembled from every rank's shard (verified).

    For export, inspection or a single-process consumer; it materialises every table whole.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if not (path / META_FILE).exists():
        raise CheckpointError(f"{path}: {META_FILE} is missing")
    _verify_files(path, manifest)
    meta = torch.load(path / META_FILE, map_location="cpu", weights_only=False)
    world = manifest["world_size"]
    tables: list[dict[str, dict]] = [{} for _ in manifest["collections"]]
    filled: list[dict[str, torch.Tensor]] = [{} for _ in manifest["collections"]]
    for r in range(world):
        shard = torch.load(path / _shard_name(r, world), map_location="cpu", weights_only=True)
        for i, saved_collection in enumerate(manifest["collections"]):
            for name, shape in saved_collection["tables"].items():
                saved = shard[_collection_key(i)][name]
                target = tables[i].setdefault(name, {"step": 0})
                mask = filled[i].setdefault(name, torch.zeros(shape["num_rows"], dtype=torch.bool))
                ids = saved["global_ids"]
                for key, value in saved.items():
                    if key in ("global_ids", "step"):
                        continue
                    if key not in target:
                        target[key] = torch.zeros(shape["num_rows"], *value.shape[1:], dtype=value.dtype)
                    target[key][ids] = value
                mask[ids] = True
                target["step"] = max(target["step"], int(saved["step"]))
    for collection in filled:
        for name, mask in collection.items():
            if not bool(mask.all()):
                raise CheckpointError(
                    f"{path}: the shards cover {int(mask.sum())} of {len(mask)} rows of {name!r}"
                )
    return {**meta, "sharded_tables": tables}


def load_shards(path: str | Path, collections: list) -> dict:
    """Verify, then load every table row this rank owns (any saved world size); return ``meta.pt``."""
    path = Path(path)
    manifest = verify(path, collections)
    meta = torch.load(path / META_FILE, map_location="cpu", weights_only=False)
    world = manifest["world_size"]
    # Assemble the new local shards in fresh tensors first; swap them in only when all are read.
    staged: list[dict[str, dict[str, torch.Tensor]]] = []
    for collection in collections:
        staged.append(
            {
                t.name: {
                    "weight": torch.empty_like(collection.stores[t.name].weight),
                    **{f"state.{k}": torch.empty_like(v) for k, v in collection.stores[t.name].state.items()},
                    "filled": torch.zeros(collection.stores[t.name].num_rows, dtype=torch.bool),
                    "step": torch.tensor(0),
                }
                for t in collection.tables
            }
        )
    for r in range(world):
        shard = torch.load(path / _shard_name(r, world), map_location="cpu", weights_only=True)
        for i, collection in enumerate(collections):
            for table in collection.tables:
                saved = shard[_collection_key(i)][table.name]
                rule = collection.rules[table.name]
                ids = saved["global_ids"]
                mine = rule.owner(ids) == collection.rank
                slots = rule.local_index(ids[mine])
                target = staged[i][table.name]
                for key, value in saved.items():
                    if key in ("global_ids", "step"):
                        continue
                    target[key][slots] = value[mine].to(target[key].dtype)
                target["filled"][slots] = True
                target["step"] = torch.maximum(target["step"], saved["step"])
    for i, collection in enumerate(collections):
        for table in collection.tables:
            target = staged[i][table.name]
            if not bool(target["filled"].all()):
                raise CheckpointError(
                    f"{path}: table {table.name!r} is missing rows for rank {collection.rank}"
                )
    for i, collection in enumerate(collections):
        for table in collection.tables:
            store, target = collection.stores[table.name], staged[i][table.name]
            store.weight.copy_(target["weight"])
            for k in store.state:
                store.state[k].copy_(target[f"state.{k}"])
            store.step = int(target["step"])
    return meta
