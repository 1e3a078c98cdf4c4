"""``bench/gpu_check.sh --dry-run`` works on CPU, so the GPU script is known good before a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_passes_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "PASS" in proc.stdout and "DRY RUN" in proc.stdout
    result = json.loads(out.with_suffix(".dry-run.json").read_text())
    # every schedule x placement was trained and compared, on one process and on two
    assert set(result["exact"]) == {
        f"{s}/{p}" for s in ("sync", "dbp", "fwp", "nested") for p in ("host", "device")
    }
    assert max(result["exact"].values()) <= 1e-10 and max(result["exact_2rank"].values()) <= 1e-10
    assert set(result["speed"]) == set(result["exact"])
    assert result["meta"]["dry_run"] is True
