"""Bad configs fail at compose time, in one line that names the key, the value and what is allowed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nestrec.run import available_recipes, check_overrides


def _error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        check_overrides(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_wrong_type_names_key_value_and_type(capsys):
    err = _error(capsys, "recipe=sasrec_ml1m", "model.dim=big", "--cfg", "job")
    assert "model.dim='big'" in err and "expected int" in err


def test_bad_choice_lists_the_allowed_values(capsys):
    err = _error(capsys, "recipe=sasrec_ml1m", "data.split=leave-one-out")
    assert "data.split='leave-one-out'" in err and "leave_one_out, temporal" in err
    err = _error(capsys, "recipe=sasrec_ml1m", "trainer.precision=33")
    assert "trainer.precision=33" in err and "bf16-mixed" in err


@pytest.mark.parametrize("override", ["model.dimm=3", "+model.dimm=3"])
def test_typo_key_gets_did_you_mean(capsys, override):
    err = _error(capsys, "recipe=sasrec_ml1m", override)
    assert "model.dimm" in err and "did you mean model.dim?" in err


def test_typo_in_trainer_flag_and_group_option(capsys):
    assert "did you mean trainer.max_time?" in _error(
        capsys, "recipe=sasrec_ml1m", "+trainer.max_tiem=00:01:00:00"
    )
    err = _error(capsys, "recipe=sasrec_ml1m", "model=sasrecc")
    assert "model=sasrecc" in err and "sasrec" in err.split("available:")[1]


def test_each_value_of_a_sweep_is_checked(capsys):
    err = _error(capsys, "-m", "recipe=sasrec_ml1m", "model.dim=32,big")
    assert "model.dim='big'" in err


@pytest.mark.parametrize("recipe", available_recipes())
@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["strategy=nestpipe", "trainer.devices=2"],
        ["strategy=ddp", "logger=none"],
        ["debug=smoke", "logger=csv"],
    ],
)
def test_every_shipped_recipe_passes(recipe, extra):
    check_overrides([f"recipe={recipe}", *extra])  # no SystemExit: no false alarms on our own configs


def test_cfg_job_exits_2_from_the_command_line():
    proc = subprocess.run(
        [sys.executable, "-m", "nestrec.run", "recipe=sasrec_ml1m", "model.dim=big", "trainer.max_epochs=ten", "--cfg", "job"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "expected int" in proc.stderr
