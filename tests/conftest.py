"""Shared test helpers: the synthetic fixture on disk, real-data lookup, and running nestrec.run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nestrec.data.fetch import dataset_dir, is_fetched
from nestrec.data.fixture import generate_fixture, write_fixture

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def fixture_raw():
    return generate_fixture()


@pytest.fixture(scope="session")
def fixture_dirs(tmp_path_factory, fixture_raw):
    """The same generated dataset written in every supported format."""
    root = tmp_path_factory.mktemp("fixture")
    return {fmt: write_fixture(root / fmt, fmt, raw=fixture_raw) for fmt in ("recbole", "ml-1m", "ml-100k")}


def real_data_dir(name: str) -> Path:
    path = dataset_dir(name)
    if not is_fetched(name):
        pytest.skip(f"MovieLens {name} is not fetched (run `make data`); `make test` fetches it first")
    return path


def run_nestrec(
    args: list[str], tmp_path: Path, timeout: int = 300, module: str = "nestrec.run", env_extra=None
):
    """Run ``python -m nestrec.run ...`` as a user would, with outputs under ``tmp_path``."""
    env = dict(os.environ)
    env.update(
        {"NESTREC_OUTPUT_ROOT": str(tmp_path / "outputs"), "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    )
    env.pop("NESTREC_SWEEP_DIR", None)
    # An in-process Lightning DDP test leaves its rendezvous variables behind; a child must pick its own.
    for key in (
        "MASTER_ADDR",
        "MASTER_PORT",
        "LOCAL_RANK",
        "RANK",
        "WORLD_SIZE",
        "NODE_RANK",
        "LOCAL_WORLD_SIZE",
    ):
        env.pop(key, None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
