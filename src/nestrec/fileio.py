"""Small file helpers shared across packages (data fetch, checkpoints, run summaries)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["sha256_file", "write_json_atomic"]


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (downloaded wheels, checkpoint shards)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON to a temporary sibling and rename it over ``path``: readers never see half a file."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
