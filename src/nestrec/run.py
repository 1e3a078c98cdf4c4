"""``python -m nestrec.run recipe=NAME [overrides]``: compose a recipe, train, evaluate, summarise.

The life of a run, top to bottom: check the recipe name (before Hydra, so a typo gets the list of
recipes instead of a stack trace) → compose the config and check it against the code it
configures (:mod:`nestrec.config_check`; also before Hydra, so ``--cfg job`` and sweeps fail on
a bad key or value in one line) → seed → build the data module, the model
stage and a Lightning ``Trainer`` from config → fit → test on the best checkpoint → write
``summary.json`` into Hydra's run directory (rank 0 only) and print the headline metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import sys
import time
from datetime import datetime
from importlib import resources
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from nestrec.building import (
    best_checkpoint,
    build_callbacks,
    build_logger,
    build_strategy,
    finish_wandb,
    log_artifact,
    scalar,
    split_trainer_config,
    wandb_identity,
)
from nestrec.fileio import write_json_atomic

__all__ = ["available_recipes", "main", "train"]

_VALUE_FLAGS = {
    "--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
    "--config-dir", "-cd", "--experimental-rerun", "--info", "-i",
}  # fmt: skip
_INFO_FLAGS = {"--help", "-h", "--hydra-help", "--info", "-i", "--version", "--shell-completion", "-sc"}


def available_recipes() -> list[str]:
    """Names of the recipes shipped in ``nestrec/conf/recipe`` (works from a wheel install too)."""
    folder = resources.files("nestrec.conf").joinpath("recipe")
    return sorted(entry.name[: -len(".yaml")] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def _requested_recipes(argv: list[str]) -> list[str] | None:
    for arg in argv:
        match = re.fullmatch(r"\+{0,2}recipe=(.*)", arg)
        if match:
            value = match.group(1).strip()
            value = re.sub(r"^(choice|range)\((.*)\)$", r"\2", value)
            return [v.strip().strip("'\"") for v in value.split(",") if v.strip()]
    return None


def _check_recipe(argv: list[str]) -> None:
    """Exit 2 with the list of recipes if none (or an unknown one) was asked for."""
    if _INFO_FLAGS.intersection(argv) or any(a.startswith(("--cfg", "-c", "--package", "-p")) for a in argv):
        return
    recipes = available_recipes()
    listing = "\n".join(f"  {name}" for name in recipes)
    requested = _requested_recipes(argv)
    if not requested:
        print(
            f"error: no recipe given. Usage: python -m nestrec.run recipe=NAME [overrides]\navailable recipes:\n{listing}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if any(arg.startswith("hydra.searchpath") for arg in argv):
        return  # recipes may come from the user's own search path; Hydra reports unknown ones
    unknown = [name for name in requested if name not in recipes]
    if unknown:
        print(f"error: unknown recipe {', '.join(unknown)}\navailable recipes:\n{listing}", file=sys.stderr)
        raise SystemExit(2)


def _config_overrides(argv: list[str]) -> list[list[str]] | None:
    """The job overrides of ``argv`` as override lists to compose, one per value of each sweep
    (every other sweep at its first value); ``None`` when the search path is the user's own."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    words, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _VALUE_FLAGS:
            skip = True  # the flag's value (`--cfg job`) is not an override
        elif not arg.startswith("-"):
            words.append(arg)
    if any(w.lstrip("+~").startswith("hydra.searchpath") for w in words):
        return None  # user config dirs: Hydra composes them; train() checks the job config
    parsed = OverridesParser.create().parse_overrides(
        [w for w in words if not w.lstrip("+~").startswith(("hydra.", "hydra/"))]
    )
    base, sweeps = [], []
    for override in parsed:
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())
            sweeps.append((override, values))
            base.append(f"{override.get_key_element()}={values[0]}")
        else:
            base.append(override.input_line)
    combos = [base]
    for override, values in sweeps:
        position = next(i for i, o in enumerate(parsed) if o is override)
        for value in values[1:]:
            combo = list(base)
            combo[position] = f"{override.get_key_element()}={value}"
            combos.append(combo)
    return combos


def check_overrides(argv: list[str]) -> None:
    """Compose the config ``argv`` asks for and check it; exit 2 with one line if it is wrong."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from nestrec.config_check import check_config
    from nestrec.errors import ConfigError

    try:
        combos = _config_overrides(argv)
    except HydraException as err:
        _exit_config_error(str(err))
    for overrides in combos or []:
        try:
            with initialize_config_module(config_module="nestrec.conf", version_base="1.3"):
                cfg = compose("config", overrides=overrides)
            check_config(cfg)
        except ConfigError as err:
            _exit_config_error(str(err))
        except (HydraException, OmegaConfBaseException) as err:
            _exit_config_error(_one_line(str(err), overrides))


def _one_line(message: str, overrides: list[str]) -> str:
    """Hydra's multi-line composition errors as one line, with a "did you mean" for a typo'd key."""
    import difflib

    match = re.search(r"Could not override '([^']+)'", message)
    if match:
        key = match.group(1)
        parent, _, leaf = key.rpartition(".")
        rest = [o for o in overrides if not o.lstrip("+~").startswith(f"{key}=")]
        from hydra import compose, initialize_config_module

        with initialize_config_module(config_module="nestrec.conf", version_base="1.3"):
            cfg = compose("config", overrides=rest)
        node = OmegaConf.select(cfg, parent) if parent else cfg
        known = list(node.keys()) if isinstance(node, DictConfig) else []
        close = difflib.get_close_matches(leaf, known, n=1, cutoff=0.6)
        suggestion = (
            f"did you mean {parent + '.' if parent else ''}{close[0]}?"
            if close
            else f"add it with +{key}=..."
        )
        return f"{key} is not a key of the config; {suggestion}"
    match = re.search(r"Could not find '([^']+)/([^'/]+)'", message)
    if match:
        group, option = match.groups()
        options = re.search(rf"Available options in '{re.escape(group)}':\n((?:\t.*\n?)*)", message)
        listing = ", ".join(o.strip() for o in options.group(1).splitlines() if o.strip()) if options else ""
        plugin = " (Hydra's sweeper/launcher plugins come with the sweep extra: pip install -e '.[sweep]')"
        return (
            f"{group}={option} is not an option of the {group!r} group"
            + (f" (available: {listing})" if listing else "")
            + (plugin if group.startswith("hydra/") else "")
        )
    return " ".join(line.strip() for line in message.strip().splitlines() if line.strip())


def _exit_config_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main() -> None:
    """Console entry point (``nestrec-run`` / ``python -m nestrec.run``)."""
    argv = sys.argv[1:]
    _check_recipe(argv)
    if not _INFO_FLAGS.intersection(argv):
        check_overrides(argv)
    if "-m" in argv or "--multirun" in argv:
        # Lightning's popen DDP launcher re-runs this command per rank; the children must resolve
        # the same sweep directory as the parent, which `${now:...}` alone would not give them.
        os.environ.setdefault("NESTREC_SWEEP_DIR", f"multirun/{datetime.now():%Y-%m-%d/%H-%M-%S}")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    _hydra_main()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    from hydra.errors import InstantiationException

    from nestrec.errors import UserInputError

    try:
        return train(cfg)
    except (UserInputError, InstantiationException) as err:
        # Hydra wraps constructor errors; show the user's mistake, not the wrapping.
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
        if not isinstance(cause, UserInputError) and isinstance(err, InstantiationException):
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


# --------------------------------------------------------------------------------------------------


def _output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def _recipe_name() -> str | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get("recipe")


def config_hash(cfg: DictConfig) -> str:
    """Stable hash of the resolved run config (Hydra's own settings excluded), to group sweep results."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _versions() -> dict[str, str]:
    import hydra as hydra_pkg
    import lightning
    import torch
    import torchmetrics

    import nestrec

    return {
        "nestrec": nestrec.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "hydra": hydra_pkg.__version__,
        "torchmetrics": torchmetrics.__version__,
    }


def train(cfg: DictConfig) -> float | None:
    """Run one job from a composed config; returns the monitored metric (for Hydra sweepers)."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from nestrec.config_check import check_config

    started = time.time()
    check_config(cfg)  # the job's own config (sweep combinations, user search paths, Python callers)
    output_dir = _output_dir()
    recipe = _recipe_name()
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.get("stages"):
        return _train_stages(cfg, output_dir, recipe, started)

    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = instantiate(cfg.model, _convert_="all", **datamodule.model_kwargs())

    trainer_cfg, extra_callbacks = split_trainer_config(cfg.trainer)
    callbacks = build_callbacks(
        cfg.get("callbacks"),
        output_dir,
        cfg.run.monitor,
        cfg.run.monitor_mode,
        cfg.run.early_stopping_patience,
        extra_callbacks,
    )
    logger = build_logger(
        cfg.get("logger"),
        output_dir,
        run_name=f"{recipe}-{output_dir.name}",
        identity=wandb_identity(output_dir, recipe),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    trainer = instantiate(
        trainer_cfg,
        strategy=build_strategy(cfg.strategy),
        logger=logger,
        callbacks=callbacks,
        default_root_dir=str(output_dir),
        _convert_="all",
    )
    if trainer.is_global_zero:
        print(f"[nestrec] recipe={recipe} data={json.dumps(datamodule.describe())}", flush=True)
        if logger and type(logger).__name__ != "WandbLogger":  # W&B got the config at init
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    if cfg.run.fit:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.run.ckpt_path)
    checkpoint = best_checkpoint(callbacks)
    best_path = checkpoint.best_model_path if checkpoint is not None else ""
    metrics: dict[str, float] = {}
    if cfg.run.fit:
        metrics.update(
            {k: scalar(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
        )
    if cfg.run.test:
        # After fitting, test the best checkpoint; in test-only runs, the one given.
        best = best_path or None
        ckpt_path = best if cfg.run.fit else cfg.run.ckpt_path
        results = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
        for result in results:
            metrics.update({k: scalar(v) for k, v in result.items()})

    summary = {
        "recipe": recipe,
        "status": "ok",
        "metrics": metrics,
        "monitor": cfg.run.monitor,
        "best_checkpoint": best_path or None,
        "best_score": scalar(checkpoint.best_model_score)
        if checkpoint is not None and checkpoint.best_model_score is not None
        else None,
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "config_hash": config_hash(cfg),
        "wall_time_s": round(time.time() - started, 2),
        "data": datamodule.describe(),
        "world_size": trainer.world_size,
        "output_dir": str(output_dir),
        "versions": _versions(),
        "finished_at": datetime.now().isoformat(timespec="seconds"),
    }
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output_dir / "summary.json", summary)
        log_artifact(logger, f"{recipe}-checkpoint", "model", [best_path])
        log_artifact(logger, f"{recipe}-summary", "results", [output_dir / "summary.json"])
        _print_headline(summary)
    finish_wandb(logger)
    if trainer.is_global_zero:
        print_outputs(output_dir)
    monitored = metrics.get(cfg.run.monitor)
    return monitored


def _train_stages(cfg: DictConfig, output_dir: Path, recipe: str | None, started: float) -> float | None:
    """A multi-stage recipe (``stages:`` block): see :mod:`nestrec.stages`."""
    from nestrec.stages import run_stages

    metrics, results, datamodule = run_stages(cfg, output_dir, recipe)
    last = cfg.stages.order[-1]
    summary = {
        "recipe": recipe,
        "status": "ok",
        "metrics": metrics,
        "stages": results,
        "monitor": f"{last}/{cfg.run.monitor}",
        "config_hash": config_hash(cfg),
        "wall_time_s": round(time.time() - started, 2),
        "data": datamodule.describe(),
        "output_dir": str(output_dir),
        "versions": _versions(),
        "finished_at": datetime.now().isoformat(timespec="seconds"),
    }
    if os.environ.get("LOCAL_RANK", "0") == "0":
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(output_dir / "summary.json", summary)
        _print_stage_headline(summary, cfg.stages.order)
        print_outputs(output_dir, [Path(r["dir"]) for r in results.values() if r.get("dir")])
    return metrics.get(summary["monitor"])


def _print_stage_headline(summary: dict, order: list[str]) -> None:
    metrics = summary["metrics"]
    for stage in order:
        scenarios = sorted(
            {m.group(1) for k in metrics if (m := re.fullmatch(rf"{stage}/test/([^/]+)/ndcg@10", k))}
        )
        for name in scenarios:
            print(
                f"[nestrec] {stage:<8} test {name:<9} HR@10={metrics[f'{stage}/test/{name}/hr@10']:.4f}"
                f" Recall@10={metrics[f'{stage}/test/{name}/recall@10']:.4f}"
                f" NDCG@10={metrics[f'{stage}/test/{name}/ndcg@10']:.4f}"
            )
    print(
        f"[nestrec] summary: {summary['output_dir']}/summary.json ({summary['wall_time_s']:.1f}s)", flush=True
    )


def print_outputs(output_dir: Path, stage_dirs: list[Path] | None = None) -> None:
    """Where the run's results, plots and W&B offline runs are, and how to upload the runs."""
    found = [
        p for p in ("summary.json", "comparison.md", "comparison.png", "serving") if (output_dir / p).exists()
    ]
    print(f"[nestrec] results: {output_dir}/ ({', '.join(found)})", flush=True)
    roots = [output_dir, *(stage_dirs or [])]
    runs = sorted({d for root in roots for d in root.rglob("offline-run-*") if d.is_dir()})
    if runs:
        print(f"[nestrec] W&B: {len(runs)} offline run(s), e.g. {runs[0]}", flush=True)
        print(f"[nestrec] upload them with: wandb sync {' '.join(str(r) for r in runs)}", flush=True)


def _print_headline(summary: dict) -> None:
    metrics = summary["metrics"]
    for stage in ("val", "test"):
        if f"{stage}/hr@10" in metrics:
            print(
                f"[nestrec] {stage}: HR@10={metrics[f'{stage}/hr@10']:.4f} NDCG@10={metrics[f'{stage}/ndcg@10']:.4f}"
            )
        if f"{stage}/auc" in metrics:
            print(
                f"[nestrec] {stage}: AUC={metrics[f'{stage}/auc']:.4f} logloss={metrics.get(f'{stage}/logloss', float('nan')):.4f}"
            )
    for key in sorted(metrics):
        match = re.fullmatch(r"test/([^/]+)/ndcg@10", key)
        if match and match.group(1) != "overall":
            name = match.group(1)
            print(
                f"[nestrec]   test {name:<9} HR@10={metrics[f'test/{name}/hr@10']:.4f} NDCG@10={metrics[key]:.4f}"
            )
    print(
        f"[nestrec] summary: {summary['output_dir']}/summary.json ({summary['wall_time_s']:.1f}s)", flush=True
    )


if __name__ == "__main__":
    main()
