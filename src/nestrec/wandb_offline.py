"""Read what a W&B *offline* run recorded, without uploading it.

``make run`` logs offline by default (no account, no network); ``wandb sync`` uploads later. To
check or summarise such runs here — the tests do — this reads the run's transaction log
(``offline-run-*/run-*.wandb``): W&B's record log (a ``:W&B`` header, then 32 KiB blocks of
CRC-framed chunks, LevelDB-log style) of ``wandb.proto`` ``Record`` messages. The protobuf
schema is W&B's own (``wandb.proto.wandb_internal_pb2``), so only the framing is read by hand.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["OfflineRun", "offline_runs", "read_offline_run", "records"]

_BLOCK = 32 * 1024
_HEADER = 7  # crc32 (4) + length (2) + chunk type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: str | Path) -> Iterator[bytes]:
    """The serialized records of a ``.wandb`` transaction log, in order (the chunk CRCs are not
    verified: a damaged log shows up as a record that does not parse)."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, pending = 7, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


@dataclass
class OfflineRun:
    directory: Path
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    artifacts: list[tuple[str, str]] = field(default_factory=list)  # (name, type)
    history_keys: set[str] = field(default_factory=set)
    history: list[dict] = field(default_factory=list)  # one dict per logged step (scalars only)
    images: list[Path] = field(default_factory=list)


def read_offline_run(directory: str | Path) -> OfflineRun:
    """Group, job type, tags, config, logged artifacts, history keys and images of one offline run."""
    from wandb.proto import wandb_internal_pb2 as pb

    directory = Path(directory)
    run = OfflineRun(directory)
    for data in records(next(directory.glob("run-*.wandb"))):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.name, run.group, run.job_type = (
                record.run.display_name,
                record.run.run_group,
                record.run.job_type,
            )
            run.tags = list(record.run.tags)
            run.config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            run.config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "artifact":
            run.artifacts.append((record.artifact.name, record.artifact.type))
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                run.history_keys.add(key)
                value = json.loads(item.value_json) if item.value_json else None
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    row[key] = value
            run.history.append(row)
    run.images = sorted((directory / "files" / "media" / "images").glob("*.png"))
    return run


def offline_runs(root: str | Path) -> list[OfflineRun]:
    """Every offline run under ``root`` (e.g. a run directory with several stages)."""
    return [read_offline_run(d) for d in sorted(Path(root).rglob("offline-run-*")) if d.is_dir()]
