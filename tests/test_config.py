"""Config composition: every recipe composes, precedence is CLI > debug > recipe > defaults,
and bad command lines fail with a short message instead of a stack trace."""

from __future__ import annotations

import sys

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import get_object
from omegaconf import OmegaConf

from conftest import run_nestrec
from nestrec.run import available_recipes, check_overrides, main

GROUPS = ("data", "model", "strategy", "trainer", "logger", "scenario", "reward", "debug")


def _compose(*overrides: str):
    with initialize_config_module(config_module="nestrec.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_config_groups_exist():
    from importlib import resources

    root = resources.files("nestrec.conf")
    for group in (*GROUPS, "recipe"):
        assert any(e.name.endswith(".yaml") for e in root.joinpath(group).iterdir()), group


@pytest.mark.parametrize("recipe", available_recipes())
@pytest.mark.parametrize("debug", [None, "smoke"])
def test_every_recipe_composes_and_targets_import(recipe, debug):
    cfg = _compose(f"recipe={recipe}", *([f"debug={debug}"] if debug else []))
    OmegaConf.resolve(cfg)
    for group in ("data", "model", "trainer"):
        assert callable(get_object(cfg[group]["_target_"]))
    if debug == "smoke":
        assert cfg.trainer.max_epochs <= 2 and cfg.data.max_users is not None


def test_precedence_cli_over_debug_over_recipe():
    assert _compose("recipe=sasrec_ml100k").trainer.max_epochs == 40
    assert _compose("recipe=sasrec_ml100k").data.dataset == "ml-100k"
    assert _compose("recipe=sasrec_ml100k", "debug=smoke").trainer.max_epochs == 2
    assert _compose("recipe=sasrec_ml100k", "debug=smoke", "trainer.max_epochs=3").trainer.max_epochs == 3
    assert _compose("recipe=sasrec_ml100k", "data=ml1m").data.dataset == "ml-1m"
    assert _compose("recipe=sasrec_multi_ml1m").data.scenarios == ["homepage", "channel", "related", "search"]


def test_missing_recipe_lists_recipes_and_exits_2(tmp_path):
    result = run_nestrec([], tmp_path)
    assert result.returncode == 2
    assert "no recipe given" in result.stderr and "sasrec_ml1m" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_recipe_key_or_choice_fails_in_one_line_before_the_run(capsys, monkeypatch):
    """In-process: the command line's exit code and stderr are covered above and by
    test_config_check's CLI test; here each mistake is refused before any run starts."""
    monkeypatch.setattr(sys, "argv", ["nestrec.run", "recipe=nope"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "unknown recipe nope" in err and "sasrec_ml100k" in err
    for argv, expected in (
        (
            ["trainer.max_epoch=3"],
            "error: trainer.max_epoch is not a key of the config; did you mean trainer.max_epochs?",
        ),
        (["model=nosuchmodel"], "model=nosuchmodel is not an option of the 'model' group"),
        (
            ["data.split=random"],
            "error: data.split='random' is not allowed: expected one of leave_one_out, temporal",
        ),
    ):
        with pytest.raises(SystemExit) as exit_info:
            check_overrides(["recipe=sasrec_ml1m", *argv])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and expected in err and "\n" not in err, err


def test_bad_data_input_is_one_line_error(tmp_path):
    result = run_nestrec(["recipe=sasrec_ml1m", f"data.path={tmp_path / 'missing'}", "logger=none"], tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert "missing" in line and "does not exist" in line
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("summary.json"))
