"""``python -m nestrec.export checkpoint=PATH out=DIR``: a trained OxygenREC model as a serving artifact.

Reads a checkpoint of :class:`~nestrec.oxygen.module.OxygenPretrainModule` (or any subclass, e.g.
the RL post-training module: only the ``model.*`` weights, the SID registry and the model-shape
hyper-parameters are used; anything else a subclass saves is ignored), rebuilds the data module it
was trained with (its settings travel in the checkpoint) to collect what a request needs but a
client will not send, and writes the directory described in :mod:`nestrec.serve.artifact`.

Refusals, each one line (exit status 2): a checkpoint without a SID registry, a registry whose
version differs from the hyper-parameters or from what the data tokenises to today (the SID
tokens would mean other items), data whose catalogue, genres or profile fields changed shape, an
instruction cache whose vectors have another width than the text encoder or are not its output
(checked by re-encoding a sample of rows' instruction text), an existing ``out``
without ``overwrite=true``. The artifact is written to a sibling directory and renamed into place,
so a failed export leaves nothing half-written.

Dense and NestPipe-sharded checkpoints (a directory of shards) both export: the sharded item
table is reassembled from every rank's shard file.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic_settings import SettingsConfigDict
from safetensors.torch import save_file

import nestrec
from nestrec.errors import UserInputError
from nestrec.fileio import sha256_file
from nestrec.serve import artifact as fmt
from nestrec.serve.settings import CommandSettings, parse_settings, setting, usage

__all__ = ["ExportSettings", "export_artifact", "main"]

#: OxygenPretrainModule hyper-parameters that shape OxygenModel (everything else is training-only).
MODEL_KEYS = (
    "d_model",
    "heads",
    "encoder_layers",
    "decoder_layers",
    "ffn",
    "dropout",
    "recent_len",
    "long_len",
    "igr",
    "igr_k",
    "igr_alpha",
    "igr_stop_grad",
    "instruction",
    "instruction_position",
    "moe_experts",
    "moe_active",
    "encoder_window",
    "user_trigger_items",
    "attention_dropout",
    "decoder_reads_state",
)
DEFAULT_K = 10


def history_length(config: dict) -> int:
    """How many newest items the model reads: its causal window (or recent items) + IGR's pool."""
    context = int(config.get("window_len") or 0) or int(config.get("recent_len", 20))
    return context + int(config.get("long_len", 100))


class ExportError(UserInputError):
    """The checkpoint cannot be exported as asked; the message says why."""


class ExportSettings(CommandSettings):
    """Settings of ``python -m nestrec.export`` (each one is ``key=value`` on the command line, or
    ``NESTREC_EXPORT_<KEY>`` in the environment)."""

    model_config = SettingsConfigDict(env_prefix="NESTREC_EXPORT_", extra="forbid")

    checkpoint: str = setting("", "a checkpoint (.ckpt file, or a NestPipe sharded checkpoint directory)")
    run: str = setting("", "or a run directory: exports its summary.json's best checkpoint")
    out: str = setting("", "the artifact directory to create (required)")
    overwrite: bool = setting(False, "replace an existing artifact at out")
    cri: str = setting("", "instruction cache to copy in: a path, `none`, or unset = the training data's")
    beam: dict[str, int] = setting(
        help="beam width per scenario, e.g. beam.search=64 (default: training's)", default_factory=dict
    )
    k: dict[str, int] = setting(
        help=f"items returned per scenario, e.g. k.homepage=20 (default {DEFAULT_K})", default_factory=dict
    )
    max_beam: int = setting(512, "the largest beam a request may ask for")
    max_k: int = setting(100, "the largest K a request may ask for")
    data: dict[str, str] = setting(
        help="data-module overrides, e.g. data.cache_dir=/data (default: as trained)", default_factory=dict
    )


# -- reading the checkpoint --------------------------------------------------------------------------
def resolve_checkpoint(settings: ExportSettings) -> Path:
    if bool(settings.checkpoint) == bool(settings.run):
        raise ExportError("give exactly one of checkpoint=PATH or run=DIR")
    if settings.checkpoint:
        path = Path(settings.checkpoint).expanduser()
        if not path.exists():
            raise ExportError(f"checkpoint {path} does not exist")
        return path
    summary = Path(settings.run).expanduser() / "summary.json"
    if not summary.exists():
        raise ExportError(f"{summary} does not exist: run= must be a finished `nestrec.run` output directory")
    best = json.loads(summary.read_text()).get("best_checkpoint")
    if not best or not Path(best).exists():
        raise ExportError(
            f"{summary} names no existing best_checkpoint ({best!r}); pass checkpoint=PATH instead"
        )
    return Path(best)


def _sharded_item_table(path: Path) -> torch.Tensor:
    """The full item-ID table of a NestPipe sharded checkpoint, from every rank's shard."""
    from nestrec.checkpoint.sharded import CheckpointError, consolidate

    try:
        collections = consolidate(path)["sharded_tables"]
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    found = [c["item"] for c in collections if "item" in c]
    if len(found) != 1:
        raise ExportError(f"{path}: expected one sharded 'item' table, found {len(found)}")
    return found[0]["weight"].float()


def load_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(checkpoint dict, OxygenModel state dict) of a dense or sharded checkpoint."""
    from nestrec.checkpoint.sharded import META_FILE, is_sharded_checkpoint

    sharded = is_sharded_checkpoint(path)
    # Lightning checkpoints hold plain-Python hyper-parameters next to tensors: a trusted file.
    checkpoint = torch.load(path / META_FILE if sharded else path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ExportError(f"{path} is not a Lightning checkpoint (no state_dict)")
    if "sid_registry" not in checkpoint:
        raise ExportError(
            f"{path} has no SID registry: it was not written by OxygenPretrainModule or a subclass"
        )
    state = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    if checkpoint.get("hyper_parameters", {}).get("embedding") == "sharded":
        if not sharded:
            raise ExportError(
                f"{path}: the model has a sharded item table but this is not a sharded checkpoint"
            )
        state = {k: v for k, v in state.items() if not k.startswith("item_id.")}
        state["item_id.weight"] = _sharded_item_table(path)
    return checkpoint, state


# -- rebuilding the data the model was trained on ------------------------------------------------------
def _auto(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None, "null": None}.get(value.lower(), value)


def rebuild_data(checkpoint: dict, overrides: dict[str, str]):
    """The checkpoint's OxygenDataModule, set up (its hyper-parameters travel in the checkpoint)."""
    from nestrec.data.datamodule import SequenceDataModule
    from nestrec.oxygen.data import OxygenDataModule

    saved = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    if not saved and "dataset" not in overrides and "path" not in overrides:
        raise ExportError("the checkpoint has no data-module settings; pass data.dataset=... (and the rest)")
    accepted = set(inspect.signature(OxygenDataModule).parameters) | set(
        inspect.signature(SequenceDataModule).parameters
    )
    kwargs = {k: v for k, v in saved.items() if k in accepted and k != "max_len"}
    kwargs.update({k: _auto(v) for k, v in overrides.items()})
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ExportError(f"unknown data setting(s) {unknown}")
    kwargs["cri_cache"] = None  # the training join is not needed here; the cache is copied below
    if "cri_cache" not in accepted:
        kwargs.pop("cri_cache")
    dm = OxygenDataModule(**kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm, saved.get("cri_cache")


def _user_histories(dm, length: int) -> np.ndarray:
    """Each user's newest ``length`` items over all their interactions (what is known at export)."""
    inter = dm.data.interactions
    users, items = inter["user"].to_numpy(), inter["item"].to_numpy()
    out = np.zeros((dm.data.num_users, length), dtype=np.int32)
    if not len(users):
        return out
    cuts = np.flatnonzero(np.diff(users)) + 1  # interactions are sorted by (user, time)
    for user, seq in zip(users[np.concatenate([[0], cuts])], np.split(items, cuts)):
        tail = seq[-length:]
        out[int(user), length - len(tail) :] = tail
    return out


def _user_seen(dm) -> tuple[np.ndarray, np.ndarray]:
    """Every item each user interacted with, as CSR (offsets ``[users + 1]``, sorted unique items).

    The model reads only the newest :func:`history_length` items, but ``exclude_history`` must
    remove every item the user has seen, however old.
    """
    inter = dm.data.interactions
    users, items = inter["user"].to_numpy(), inter["item"].to_numpy()
    per_user: list[np.ndarray] = [np.zeros(0, dtype=np.int32)] * dm.data.num_users
    if len(users):
        cuts = np.flatnonzero(np.diff(users)) + 1  # interactions are sorted by (user, time)
        for user, seq in zip(users[np.concatenate([[0], cuts])], np.split(items, cuts)):
            per_user[int(user)] = np.unique(seq).astype(np.int32)
    offsets = np.zeros(dm.data.num_users + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(seen) for seen in per_user])
    flat = np.concatenate(per_user) if per_user else np.zeros(0, dtype=np.int32)
    return offsets, flat.astype(np.int32)


def _catalogue(dm) -> dict:
    import pandas as pd

    items = dm.data.items.sort_values("item")
    rows = []
    for item, item_id, title, year, genres in zip(
        items["item"], items["item_id"], items["title"], items["year"], items["genres"]
    ):
        rows.append(
            {
                "item": int(item),
                "item_id": str(item_id),
                "title": str(title),
                "year": None if pd.isna(year) else int(year),
                "genres": [g for g in str(genres).split("|") if g],
            }
        )
    return {"genres": list(dm.data.genre_vocab), "items": rows}


# -- checks --------------------------------------------------------------------------------------------
def check_compatible(checkpoint: dict, registry, dm) -> None:
    """Refuse (one line) anything that would make the artifact serve other items than were trained."""
    from nestrec.oxygen.text import text_dim

    hp = checkpoint.get("hyper_parameters", {})
    if hp.get("registry_version") not in (None, registry.version):
        raise ExportError(
            f"SID registry version mismatch: the hyper-parameters say {hp['registry_version']}, "
            f"the checkpoint's registry is {registry.version}; the checkpoint is inconsistent"
        )
    if dm.registry.version != registry.version:
        raise ExportError(
            f"SID registry version mismatch: the model was trained with registry {registry.version}, "
            f"the data now tokenises to {dm.registry.version}; export with the data it was trained on"
        )
    checks = (
        ("items", hp.get("num_items"), dm.data.num_items),
        ("genres", hp.get("num_genres"), len(dm.data.genre_vocab)),
        ("profile field sizes", hp.get("profile_sizes"), list(dm.profile_sizes)),
        ("text dimension", hp.get("text_dim"), text_dim(dm.hparams.text_encoder)),
    )
    for name, trained, now in checks:
        if trained is not None and list(np.atleast_1d(trained)) != list(np.atleast_1d(now)):
            raise ExportError(f"the model was trained with {name} {trained}, the data now has {now}")


def _copy_cri(source: Path, target: Path, dim: int, encoder: str) -> int:
    """A consistent copy of the SQLite instruction cache (WAL included); returns its usable rows.

    Refused if its vectors are not ``dim`` wide or not ``encoder``'s (re-encoding a sample of rows'
    instruction text: the rows do not record their encoder, and hashed and MiniLM are both 384-d).
    """
    from nestrec.oxygen.cri.cache import CRICache
    from nestrec.serve.instructions import check_instruction_vectors

    if not source.is_file():
        raise ExportError(f"CRI cache {source} does not exist")
    with sqlite3.connect(str(source)) as src, sqlite3.connect(str(target)) as dst:
        src.backup(dst)
    with CRICache(target) as cache:
        records = cache.records(include_fallback=False)
    wrong = {r.vector.shape[0] for r in records if r.vector is not None and r.vector.shape != (dim,)}
    if wrong:
        raise ExportError(
            f"CRI cache {source} holds {sorted(wrong)}-d instruction vectors, the text encoder gives {dim}-d"
        )
    check_instruction_vectors(records, encoder, f"CRI cache {source}")
    return len(records)


# -- writing -------------------------------------------------------------------------------------------
def _serving_config(settings: ExportSettings, trained_beam: dict, scenarios: tuple[str, ...]) -> dict:
    for name, values in (("beam", settings.beam), ("k", settings.k)):
        unknown = sorted(set(values) - set(scenarios))
        if unknown:
            raise ExportError(f"{name} for unknown scenario(s) {unknown}; known: {', '.join(scenarios)}")
    beam = {s: int(settings.beam.get(s, trained_beam.get(s, 20))) for s in scenarios}
    k = {s: int(settings.k.get(s, min(DEFAULT_K, beam[s]))) for s in scenarios}
    for s in scenarios:
        if not 1 <= beam[s] <= settings.max_beam:
            raise ExportError(f"beam.{s}={beam[s]} is outside 1..max_beam ({settings.max_beam})")
        if not 1 <= k[s] <= min(beam[s], settings.max_k):
            raise ExportError(
                f"k.{s}={k[s]} must be in 1..min(beam.{s}, max_k) = {min(beam[s], settings.max_k)}"
            )
    return {"beam": beam, "k": k, "max_beam": settings.max_beam, "max_k": settings.max_k}


def export_artifact(settings: ExportSettings, datamodule=None) -> Path:
    """Write the artifact for ``settings``; returns its directory.

    ``datamodule``: the training run's own OxygenDataModule, already set up (a multi-stage recipe
    exports at its end); otherwise it is rebuilt from the checkpoint's data settings. Either way
    :func:`check_compatible` proves it is the data the checkpoint was trained on."""
    from nestrec.data.scenarios import SCENARIO_KINDS
    from nestrec.oxygen.model import OxygenModel
    from nestrec.oxygen.sid import SIDRegistry
    from nestrec.oxygen.text import text_dim

    if not settings.out:
        raise ExportError("out=DIR is required")
    out = Path(settings.out).expanduser()
    if out.exists() and not settings.overwrite:
        raise ExportError(f"{out} already exists; pass overwrite=true to replace it")
    path = resolve_checkpoint(settings)
    checkpoint, state = load_checkpoint(path)
    registry = SIDRegistry.from_state(checkpoint["sid_registry"])
    if datamodule is None:
        dm, trained_cri = rebuild_data(checkpoint, settings.data)
    else:
        dm = datamodule
        trained_cri = (checkpoint.get("datamodule_hyper_parameters") or {}).get("cri_cache")
    check_compatible(checkpoint, registry, dm)
    hp = checkpoint["hyper_parameters"]
    serving = _serving_config(settings, dict(hp.get("beam") or {}), SCENARIO_KINDS)

    dim = text_dim(dm.hparams.text_encoder)
    config = {key: hp[key] for key in MODEL_KEYS if key in hp}
    if "encoder_window" in config:  # the module's name for OxygenModel's window_len
        config["window_len"] = config.pop("encoder_window")
    config.update(
        text_dim=dim,
        num_scenarios=len(SCENARIO_KINDS),
        num_genres=len(dm.data.genre_vocab),
        profile_sizes=[int(s) for s in dm.profile_sizes],
        q2i_dim=int(state["psi_q.weight"].shape[0]),
    )
    model = OxygenModel(registry.codes, registry.vocab_sizes, **config)
    try:  # the artifact must load into a plain OxygenModel: prove it now, not on the serving host
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ExportError(f"{path}: weights do not fit an OxygenModel ({str(err).splitlines()[0]})") from None

    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(staging / fmt.WEIGHTS))
        (staging / fmt.REGISTRY).write_text(json.dumps(registry.state()))
        trie = registry.trie()
        save_file(fmt.trie_tensors(trie), str(staging / fmt.TRIE))
        (staging / fmt.CATALOGUE).write_text(json.dumps(_catalogue(dm)))
        length = history_length(config)
        # Profiles as the data module indexed them for training (0 = unknown value).
        profile = dm.user_profiles.to(torch.int64)
        seen_offsets, seen_items = _user_seen(dm)
        save_file(
            {
                "history": torch.from_numpy(_user_histories(dm, length)),
                "profile": profile.contiguous(),
                "seen_offsets": torch.from_numpy(seen_offsets),
                "seen_items": torch.from_numpy(seen_items),
            },
            str(staging / fmt.USERS),
        )
        users = dm.data.users.sort_values("user")
        (staging / fmt.USER_IDS).write_text(json.dumps({"user_ids": [str(u) for u in users["user_id"]]}))

        cri_source = None if settings.cri.lower() == "none" else (settings.cri or trained_cri)
        cri_rows = (
            _copy_cri(Path(cri_source).expanduser(), staging / fmt.CRI, dim, dm.hparams.text_encoder)
            if cri_source
            else None
        )

        files = {
            name: {"bytes": (staging / name).stat().st_size, "sha256": sha256_file(staging / name)}
            for name in fmt.REQUIRED_FILES
        }
        version_key = files[fmt.WEIGHTS]["sha256"] + registry.version
        manifest = {
            "format": fmt.ARTIFACT_FORMAT,
            "format_version": fmt.ARTIFACT_FORMAT_VERSION,
            "model_version": hashlib.sha256(version_key.encode()).hexdigest()[:12],
            "registry_version": registry.version,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "nestrec_version": nestrec.__version__,
            "torch_version": torch.__version__,
            "source": {
                "checkpoint": str(path.resolve()),
                "epoch": checkpoint.get("epoch"),
                "global_step": checkpoint.get("global_step"),
                "dataset": dm.data.name,
                "items": dm.data.num_items,
                "users": dm.data.num_users,
            },
            "model": config,
            "text_encoder": dm.hparams.text_encoder,
            "text_dim": dim,
            "scenarios": list(SCENARIO_KINDS),
            "serving": serving,
            "trie_nodes": trie.num_nodes,
            "cri": {"file": fmt.CRI, "source": str(cri_source), "rows": cri_rows} if cri_source else None,
            "files": files,
        }
        (staging / fmt.MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help", "help"} & set(argv):
        print(usage(ExportSettings, "python -m nestrec.export"), end="")
        return
    try:
        settings = parse_settings(argv, ExportSettings)
        started = time.time()
        out = export_artifact(settings)
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    manifest = json.loads((out / fmt.MANIFEST).read_text())
    print(
        f"nestrec.export: wrote {out} (model {manifest['model_version']}, registry {manifest['registry_version']}, "
        f"{manifest['source']['items']} items, {manifest['source']['users']} users) in {time.time() - started:.1f}s"
    )


if __name__ == "__main__":
    main()
