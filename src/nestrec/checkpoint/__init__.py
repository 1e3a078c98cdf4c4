"""Sharded checkpoints of row-sharded tables: per-rank shard files + a manifest, reshardable."""

from nestrec.checkpoint.sharded import CheckpointError, is_sharded_checkpoint, load_shards, save_shards

__all__ = ["CheckpointError", "is_sharded_checkpoint", "load_shards", "save_shards"]
