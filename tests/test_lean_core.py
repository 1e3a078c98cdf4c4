"""A plain ``pip install -e .`` (no extras) trains DLRM under NestPipe: the core path never imports
an extra's package (each one is made unimportable in the child process)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import run_nestrec


def test_dlrm_under_nestpipe_needs_no_extra(tmp_path):
    blocker = Path(__file__).parent / "lean_core"
    result = run_nestrec(
        ["recipe=dlrm_ml1m", "data=ctr_fixture", "debug=smoke", "logger=csv", "strategy=nestpipe",
         "strategy.pipeline=nested", "strategy.micro_batches=2", "trainer.devices=2", "trainer.enable_progress_bar=false"],
        tmp_path, env_extra={"PYTHONPATH": str(blocker)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(next((tmp_path / "outputs").rglob("summary.json")).read_text())
    assert summary["status"] == "ok" and "test/auc" in summary["metrics"]


def test_the_blocker_really_blocks(tmp_path):
    """Negative control: with the blocker, importing an extra fails in the child."""
    import subprocess
    import sys

    blocker = Path(__file__).parent / "lean_core"
    proc = subprocess.run(
        [sys.executable, "-c", "import transformers"],
        env={"PYTHONPATH": str(blocker)},
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "lean-core test" in proc.stderr
