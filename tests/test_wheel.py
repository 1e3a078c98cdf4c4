"""A built wheel carries the configs and recipes: compose and list them from outside the repo."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

from conftest import REPO

PROBE = """
import sys, nestrec
from pathlib import Path
assert Path(nestrec.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), nestrec.__file__
from hydra import compose, initialize_config_module
from nestrec.run import available_recipes
with initialize_config_module(config_module="nestrec.conf", version_base="1.3"):
    cfg = compose(config_name="config", overrides=["recipe=sasrec_ml1m", "debug=smoke"])
print("recipes:", ",".join(available_recipes()))
print("model:", cfg.model._target_, "max_epochs:", cfg.trainer.max_epochs)
"""


def test_wheel_install_finds_conf_and_recipes(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
         "-q", "-w", str(wheels), str(REPO)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    [wheel] = list(wheels.glob("nestrec-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "nestrec/conf/config.yaml" in names and "nestrec/conf/recipe/sasrec_ml1m.yaml" in names

    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-2000:]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = subprocess.run(
        [sys.executable, "-c", PROBE, str(target)],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert "sasrec_ml1m" in probe.stdout and "max_epochs: 2" in probe.stdout
    # The installed entry point itself resolves recipes from the wheel.
    listing = subprocess.run(
        [sys.executable, "-m", "nestrec.run"],
        cwd=outside,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listing.returncode == 2 and "sasrec_ml100k" in listing.stderr
