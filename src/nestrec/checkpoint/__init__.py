"""Sharded checkpoints of row-sharded tables: per-rank shard files + a manifest, reshardable.

``python -m nestrec.checkpoint CKPT_DIR OUT.pt`` consolidates one into a single plain file.
"""

from nestrec.checkpoint.sharded import (
    CheckpointError,
    consolidate,
    is_sharded_checkpoint,
    load_shards,
    save_shards,
)

__all__ = ["CheckpointError", "consolidate", "is_sharded_checkpoint", "load_shards", "save_shards"]
