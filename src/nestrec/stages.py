"""Multi-stage recipes: a recipe with a ``stages:`` block runs its stages in order, each once.

OxygenREC is a pipeline, not one ``fit``: slow-thinking instructions (a near-line job), unified
pre-training, a reward model, then RL post-training that needs both. Each stage:

* gets a directory ``<stages.root>/<name>-<key>``, where ``key`` hashes the stage's own config, the
  data config and the keys of the stages it depends on — change any of them and the stage re-runs,
  change nothing and it is **skipped** (its ``stage.json`` marker is reused) unless listed in
  ``stages.force``. Pointing ``stages.root`` at a shared folder lets every job of a ``-m`` sweep
  over, say, ``stages.align.model.method`` reuse one pre-training;
* writes its outputs there (CRI cache, checkpoints, its W&B/CSV logs) and a ``stage.json`` last,
  atomically, so a killed stage is simply re-run;
* is either a plain job (``cri``) or a Lightning ``fit`` (+ ``test``) with the recipe's trainer
  config plus the stage's ``trainer:`` overrides.

Multi-process strategies: the ``cri`` job runs before any ``Trainer`` exists, so only the launching
process runs it; Lightning's launcher starts the other ranks at the first ``fit``, by which time
the stage is marked done and they skip it. Every Lightning stage then runs on all ranks.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from nestrec.errors import ConfigError
from nestrec.fileio import write_json_atomic

__all__ = ["STAGE_KINDS", "run_stages"]

STAGE_KINDS = ("cri", "pretrain", "ranker", "align")
_DEPENDS = {"cri": (), "pretrain": ("cri",), "ranker": (), "align": ("cri", "pretrain", "ranker")}


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


class StageRunner:
    def __init__(self, cfg: DictConfig, output_dir: Path, recipe: str | None):
        self.cfg, self.output_dir, self.recipe = cfg, output_dir, recipe
        stages = cfg.stages
        self.order = list(stages.order)
        unknown = [s for s in self.order if s not in STAGE_KINDS]
        if unknown:
            raise ConfigError(f"unknown stage(s) {unknown} in stages.order; known: {', '.join(STAGE_KINDS)}")
        for name in self.order:
            missing = [d for d in _DEPENDS[name] if d not in self.order and d != "cri"]
            if missing:
                raise ConfigError(f"stage {name!r} needs stage(s) {missing} earlier in stages.order")
        force = list(stages.get("force") or [])
        bad = [f for f in force if f not in self.order]
        if bad:
            raise ConfigError(f"stages.force names stage(s) {bad} not in stages.order {self.order}")
        self.force = set(force)
        if "align" in self.order:  # a reward-map typo should fail now, not after an hour of stages
            from nestrec.oxygen.ranker import HEADS
            from nestrec.oxygen.reward import UnifiedRewardMap

            reward_map = UnifiedRewardMap(_plain(cfg.reward.get("scenarios")) or {}, HEADS)
            reward_map.check_covers(list(cfg.data.get("train_scenarios") or []))
        self.root = Path(stages.root).expanduser() if stages.get("root") else output_dir / "stages"
        self.caps = _plain(cfg.get("debug_stage_caps")) or {}
        self.keys: dict[str, str] = {}
        self.loggers: dict[str, Any] = {}
        self.results: dict[str, dict] = {}
        self.datamodule = None

    # -- bookkeeping --------------------------------------------------------------------------------
    def stage_dir(self, name: str) -> Path:
        cfg = self.cfg
        upstream = [self.keys[d] for d in _DEPENDS[name] if d in self.keys]
        model = _plain(cfg.model) if name in ("pretrain", "align") else None
        reward = _plain(cfg.reward) if name == "align" else None
        if name == "cri":
            from nestrec.oxygen.cri.prompt import PROMPT_VERSION

            how = PROMPT_VERSION
        else:  # what shapes a Lightning stage's result besides its own block
            how = [_plain(cfg.trainer), _plain(cfg.strategy), cfg.run.monitor, cfg.run.monitor_mode]
        self.keys[name] = _key(
            name,
            _plain(cfg.stages[name]),
            _plain(cfg.data),
            model,
            reward,
            how,
            upstream,
            cfg.seed,
            self.caps,
        )
        return self.root / f"{name}-{self.keys[name]}"

    def _forced(self, name: str) -> bool:
        """Forced, or downstream of a forced stage (its inputs are about to change)."""
        return name in self.force or any(self._forced(d) for d in _DEPENDS[name] if d in self.order)

    def _done(self, directory: Path) -> dict | None:
        marker = directory / "stage.json"
        return json.loads(marker.read_text()) if marker.exists() else None

    def _is_rank_zero(self) -> bool:
        return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> dict:
        from hydra.utils import instantiate

        self.datamodule = instantiate(self.cfg.data, _convert_="all")
        self.datamodule.prepare_data()
        self.datamodule.setup("fit")
        for name in self.order:
            directory = self.stage_dir(name)
            forced = self._forced(name)
            if name == "cri" and not self._is_rank_zero():
                forced = False  # rank 0 (re)ran it before the launcher started this rank
            done = None if forced else self._done(directory)
            if done is not None:
                print(f"[nestrec] stage {name}: finished earlier, reusing {directory}", flush=True)
            else:
                print(f"[nestrec] stage {name}: running in {directory}", flush=True)
                directory.mkdir(parents=True, exist_ok=True)
                started = time.time()
                done = getattr(self, f"_run_{name}")(directory)
                done["wall_time_s"] = round(time.time() - started, 2)
                if self._is_rank_zero():
                    write_json_atomic(directory / "stage.json", done)
            done["dir"] = str(directory)
            self.results[name] = done
            if name == "cri":
                self.datamodule.attach_instructions(done["cache"])
        return self.results

    # -- stages -------------------------------------------------------------------------------------
    def _run_cri(self, directory: Path) -> dict:
        from nestrec.oxygen.cri.backends import build_backend
        from nestrec.oxygen.cri.cache import CRICache
        from nestrec.oxygen.cri.pipeline import CRIJob, plan_windows
        from nestrec.oxygen.cri.prompt import PROMPT_VERSION, RuleBasedReasoner
        from nestrec.oxygen.text import encode_texts

        spec = self.cfg.stages.cri
        path = directory / "cri.sqlite"
        if not self._is_rank_zero():  # other ranks never get here before rank 0 finished (see module doc)
            raise RuntimeError("the cri stage must finish on rank 0 before other ranks start")
        if self._forced("cri"):  # forced: regenerate every window, not resume from the old cache
            for stale in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                stale.unlink(missing_ok=True)
        dm = self.datamodule
        if spec.backend == "rules":
            backend = RuleBasedReasoner()
        else:
            options = _plain(spec.get("backend_options")) or {}
            if spec.get("guided_json"):  # the model writes the intent; the JSON skeleton is fixed
                from nestrec.oxygen.cri.prompt import JSON_PREFIX, JSON_STOP, JSON_SUFFIX

                options.update(response_prefix=JSON_PREFIX, stop=JSON_STOP, response_suffix=JSON_SUFFIX)
            backend = build_backend(spec.backend, **options)
        max_users = spec.max_users
        cap = self.caps.get("cri", {}).get("max_users")
        if cap is not None:
            max_users = cap if max_users is None else min(max_users, cap)
        keys = plan_windows(dm.split, max_users, spec.window_seconds, spec.train_windows, self.cfg.seed)
        encoder = dm.hparams.text_encoder
        with CRICache(path, backend.name, PROMPT_VERSION) as cache:
            job = CRIJob(
                backend,
                cache,
                lambda texts: encode_texts(texts, encoder),
                dm.data,
                window_seconds=spec.window_seconds,
                recent=spec.recent,
                batch_size=spec.batch_size,
                max_retries=spec.max_retries,
            )
            stats = job.run(keys)
            totals = cache.stats()
        print(f"[nestrec] cri: {json.dumps({k: v for k, v in stats.as_dict().items() if k != 'examples'})}")
        for example in stats.examples[:2]:
            print(f"[nestrec] cri example: {example}")
        return {"cache": str(path), "backend": backend.name, "stats": stats.as_dict(), "cache_totals": totals}

    def _trainer(self, directory: Path, name: str, overrides: Any, monitor: str, mode: str):
        from hydra.utils import instantiate

        from nestrec.building import (
            best_checkpoint,
            build_callbacks,
            build_logger,
            build_strategy,
            split_trainer_config,
            wandb_identity,
        )

        trainer_cfg = OmegaConf.merge(self.cfg.trainer, overrides or {}, self.caps.get("trainer", {}))
        trainer_cfg, extra_callbacks = split_trainer_config(trainer_cfg)
        callbacks = build_callbacks(
            self.cfg.get("callbacks"), directory, monitor, mode, None, extra_callbacks
        )
        logger = build_logger(
            self.cfg.get("logger"),
            directory,
            run_name=f"{self.recipe}-{name}",
            job_type=name,
            identity=wandb_identity(self.output_dir, self.recipe),
            config=_plain(self.cfg),
        )
        trainer = instantiate(
            trainer_cfg,
            strategy=build_strategy(self.cfg.strategy),
            logger=logger,
            callbacks=callbacks,
            default_root_dir=str(directory),
            _convert_="all",
        )
        return trainer, best_checkpoint(callbacks), logger

    def _fit_and_test(
        self, directory: Path, name: str, module, datamodule, spec, monitor: str, mode: str, test: bool
    ):
        from nestrec.building import finish_wandb, log_artifact, scalar

        trainer, best, logger = self._trainer(directory, name, spec.get("trainer"), monitor, mode)
        trainer.fit(module, datamodule=datamodule)
        best_path = (best.best_model_path if best is not None else None) or None
        metrics = {
            k: scalar(v)
            for k, v in trainer.callback_metrics.items()
            if k.startswith(("val/", "train/", "rl/"))
        }
        if test:
            for result in trainer.test(
                module,
                datamodule=datamodule,
                ckpt_path=best_path,
                verbose=False,
            ):
                metrics.update({k: scalar(v) for k, v in result.items()})
        self.loggers[name] = logger
        if self._is_rank_zero():
            log_artifact(logger, f"{self.recipe}-{name}-checkpoint", "model", [best_path])
        out = {
            "metrics": metrics,
            "checkpoint": best_path,
            "global_step": trainer.global_step,
        }
        if name != "align":
            finish_wandb(logger)
        return out

    def _pretrain_module(self, cls=None, **extra):
        from hydra.utils import get_class

        params = _plain(self.cfg.model)
        cls = cls or get_class(params.pop("_target_"))
        params.pop("_target_", None)
        return cls(**params, **self.datamodule.model_kwargs(), **extra)

    def _run_pretrain(self, directory: Path) -> dict:
        module = self._pretrain_module()
        return self._fit_and_test(
            directory,
            "pretrain",
            module,
            self.datamodule,
            self.cfg.stages.pretrain,
            self.cfg.run.monitor,
            self.cfg.run.monitor_mode,
            test=True,
        )

    def _run_ranker(self, directory: Path) -> dict:
        from nestrec.oxygen.ranker import RankerData, UnifiedRankerModule

        spec = self.cfg.stages.ranker
        dm = self.datamodule
        module = UnifiedRankerModule(
            dm.num_items,
            len(dm.data.genre_vocab),
            list(dm.profile_sizes),
            dm.hparams.recent_len,
            **(_plain(spec.get("model")) or {}),
        )
        data = RankerData(dm, spec.negatives, spec.batch_size, self.cfg.seed)
        return self._fit_and_test(directory, "ranker", module, data, spec, "val/auc_watch", "max", test=False)

    def _run_align(self, directory: Path) -> dict:
        from nestrec.oxygen.align import SAGCPOModule
        from nestrec.oxygen.ranker import UnifiedRankerModule

        spec = self.cfg.stages.align
        dm = self.datamodule
        ranker_ckpt = self.results["ranker"]["checkpoint"]
        ranker = UnifiedRankerModule.load_from_checkpoint(ranker_ckpt, map_location="cpu")
        module = self._pretrain_module(
            cls=SAGCPOModule,
            **(_plain(spec.get("model")) or {}),
            reward_scenarios=_plain(self.cfg.reward.get("scenarios")),
            item_text=dm.item_text,
            ranker=ranker,
        )
        module.reward_map.check_covers(dm.hparams.train_scenarios)
        state = torch.load(self.results["pretrain"]["checkpoint"], map_location="cpu", weights_only=False)[
            "state_dict"
        ]
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("ranker.")]
        if missing or unexpected:
            raise RuntimeError(
                f"pre-trained weights do not fit the policy: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        with dm.one_target_training(spec.batch_size):
            return self._fit_and_test(
                directory,
                "align",
                module,
                dm,
                spec,
                self.cfg.run.monitor,
                self.cfg.run.monitor_mode,
                test=True,
            )


def comparison_rows(results: dict[str, dict], scenarios: list[str]) -> list[list]:
    """Per scenario (+ overall): HR/Recall/NDCG@10 after pre-training and after alignment."""
    rows = []
    for scenario in [*scenarios, "overall"]:
        row = [scenario]
        for stage in ("pretrain", "align"):
            metrics = results.get(stage, {}).get("metrics", {})
            for metric in ("hr@10", "recall@10", "ndcg@10"):
                value = metrics.get(f"test/{scenario}/{metric}")
                row.append(None if value is None else round(value, 4))
        rows.append(row)
    return rows


COMPARISON_COLUMNS = [
    "scenario",
    "pretrain HR@10",
    "pretrain Recall@10",
    "pretrain NDCG@10",
    "SA-GCPO HR@10",
    "SA-GCPO Recall@10",
    "SA-GCPO NDCG@10",
]


def plot_comparison(columns: list[str], rows: list[list], path: Path, label: str) -> None:
    """Per-scenario HR@10 and NDCG@10 before (pre-training) and after alignment, as grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [row[0] for row in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric in zip(axes, ("HR@10", "NDCG@10")):
        before = [row[columns.index(f"pretrain {metric}")] or 0.0 for row in rows]
        after = [row[columns.index(f"{label} {metric}")] or 0.0 for row in rows]
        xs = range(len(scenarios))
        ax.bar([x - 0.2 for x in xs], before, width=0.4, label="pre-training")
        ax.bar([x + 0.2 for x in xs], after, width=0.4, label=f"after {label}")
        ax.set_xticks(list(xs), scenarios)
        ax.set_title(f"test {metric} by scenario")
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    def cell(v):
        return "–" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def export_serving_model(checkpoint: str | None, output_dir: Path, datamodule) -> Path | None:
    """The aligned model as a serving artifact in ``<run dir>/serving`` (what ``python -m
    nestrec.serve artifact=...`` loads), from the run's own data module (no second data set-up)."""
    from nestrec.errors import UserInputError
    from nestrec.export import ExportSettings, export_artifact

    if not checkpoint:
        print("[nestrec] export: skipped, the align stage kept no checkpoint (callbacks=none?)", flush=True)
        return None
    started = time.time()
    settings = ExportSettings(checkpoint=str(checkpoint), out=str(output_dir / "serving"), overwrite=True)
    try:
        path = export_artifact(settings, datamodule=datamodule)
    except UserInputError as err:  # the trained stages and their results stay; say why, go on
        print(f"[nestrec] export: skipped, {err}", flush=True)
        return None
    print(f"[nestrec] export: serving artifact in {path} ({time.time() - started:.0f} s); "
          f"serve it with: python -m nestrec.serve artifact={path}", flush=True)  # fmt: skip
    return path


def run_stages(cfg: DictConfig, output_dir: Path, recipe: str | None) -> tuple[dict, dict, Any]:
    """Run a multi-stage recipe; returns (flat metrics, per-stage results, the data module)."""
    runner = StageRunner(cfg, output_dir, recipe)
    results = runner.run()
    metrics: dict[str, float] = {}
    for name, result in results.items():
        for key, value in result.get("metrics", {}).items():
            metrics[f"{name}/{key}"] = value
    if "align" in results:
        method = cfg.stages.align.get("model", {}).get("method", "sagcpo")
        label = {"sagcpo": "SA-GCPO", "sapo": "SAPO", "gspo": "GSPO", "grpo": "GRPO"}.get(method, method)
        columns = [c.replace("SA-GCPO", label) for c in COMPARISON_COLUMNS]
        rows = comparison_rows(results, list(runner.datamodule.hparams.scenarios))
        table = markdown_table(columns, rows)
        logger = runner.loggers.get("align")
        if runner._is_rank_zero():
            from nestrec.building import log_artifact

            (output_dir / "comparison.md").write_text(table + "\n")
            plot_comparison(columns, rows, output_dir / "comparison.png", label)
            print(table, flush=True)
            if logger and hasattr(logger, "log_table"):
                logger.log_table(key="comparison", columns=columns, data=rows)
                logger.log_image(key="comparison_plot", images=[str(output_dir / "comparison.png")])
            log_artifact(
                logger,
                f"{recipe}-comparison",
                "results",
                [output_dir / "comparison.md", output_dir / "comparison.png"],
            )
            if cfg.stages.get("export", False):
                serving = export_serving_model(
                    results["align"].get("checkpoint"), output_dir, runner.datamodule
                )
                if serving is not None:
                    log_artifact(logger, f"{recipe}-serving", "serving-model", [serving])
        from nestrec.building import finish_wandb

        finish_wandb(logger)
    return metrics, results, runner.datamodule
