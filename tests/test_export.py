"""Export: a trained checkpoint becomes a checked, self-contained serving artifact.

One tiny OxygenREC model is trained once per session on the generated fixture (hashed text, no
download; about a second of training on one thread) and exported; ``tests/test_serve.py`` serves the same
artifact (it imports :func:`tiny` from here; the module-level cache keeps it one build).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from nestrec.data.scenarios import SCENARIO_KINDS
from nestrec.export import ExportSettings, export_artifact
from nestrec.export import main as export_main
from nestrec.oxygen.shared_memory_decoder import SharedMemoryDecoder
from nestrec.serve.__main__ import main as serve_main
from nestrec.serve.artifact import ArtifactError, load_artifact
from nestrec.serve.engine import Query, Recommender
from nestrec.serve.settings import ServeSettings, parse_settings

BEAM = 8


@dataclass
class Tiny:
    root: Path
    checkpoint: Path
    artifact: Path
    datamodule: object


_BUILT: dict[str, Tiny] = {}


@contextlib.contextmanager
def one_thread():
    """Two busy cores shared by parallel jobs: one torch thread is ~40x faster than two here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(root: Path) -> Tiny:
    import lightning.pytorch as pl

    from nestrec.oxygen.data import OxygenDataModule
    from nestrec.oxygen.module import OxygenPretrainModule

    dm = OxygenDataModule(
        dataset="fixture", text_encoder="hashed", cache_dir=str(root / "cache"), scenarios=list(SCENARIO_KINDS),
        samples_per_user=4, batch_size=64, recent_len=6, long_len=10, sid_codebook=8,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    pl.seed_everything(0, verbose=False)
    model = OxygenPretrainModule(
        **dm.model_kwargs(), d_model=32, heads=2, encoder_layers=1, decoder_layers=2, ffn=64, dropout=0.0,
        igr_k=4, beam={s: BEAM for s in SCENARIO_KINDS}, ks=(1, 5),
    )  # fmt: skip
    trainer = pl.Trainer(
        max_epochs=15, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", default_root_dir=str(root),
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    checkpoint = root / "tiny.ckpt"
    trainer.save_checkpoint(checkpoint)
    artifact = export_artifact(ExportSettings(checkpoint=str(checkpoint), out=str(root / "artifact")))
    return Tiny(root, checkpoint, artifact, dm)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    key = str(tmp_path_factory.getbasetemp())
    if key not in _BUILT:
        with one_thread():
            _BUILT[key] = _train(tmp_path_factory.mktemp("tiny-oxygen"))
    return _BUILT[key]


def _queries(art, n: int = 8, beam: int = BEAM) -> list[Query]:
    rng = np.random.default_rng(0)
    out = []
    for u in range(n):
        h = art.histories[u]
        h = h[h > 0].numpy()
        scenario = SCENARIO_KINDS[u % 4]
        out.append(
            Query(
                history=h, profile=art.profiles[u].numpy(), scenario=u % 4, k=beam, beam=beam,
                trigger_item=int(h[-1]) if scenario == "related" else 0,
                trigger_genre=u % len(art.genres) if scenario == "channel" else -1,
                reasoning=rng.standard_normal(art.text_dim).astype(np.float32) if scenario == "search" else None,
            )
        )  # fmt: skip
    return out


def _module(checkpoint: dict, genre_item_mask=None, **overrides):
    """The training module rebuilt from a checkpoint (its registry is not a hyper-parameter)."""
    from nestrec.oxygen.module import OxygenPretrainModule

    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if k != "registry_version"}
    module = OxygenPretrainModule(
        **{**hparams, **overrides}, registry_state=checkpoint["sid_registry"], genre_item_mask=genre_item_mask
    )
    module.load_state_dict(checkpoint["state_dict"], strict=not overrides)
    return module.eval()


def _one_line_error(main, argv: list[str]) -> str:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = stderr.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr.getvalue()
    return lines[0]


# -- the artifact --------------------------------------------------------------------------------------
def test_artifact_decodes_exactly_like_the_trained_module(tiny):
    manifest = json.loads((tiny.artifact / "manifest.json").read_text())
    assert manifest["format_version"] == 1 and manifest["scenarios"] == list(SCENARIO_KINDS)
    assert manifest["serving"]["beam"] == {s: BEAM for s in SCENARIO_KINDS}
    assert manifest["serving"]["k"] == {s: BEAM for s in SCENARIO_KINDS}  # min(10, beam)
    art = load_artifact(tiny.artifact)
    assert art.num_items == tiny.datamodule.data.num_items and art.num_users == tiny.datamodule.data.num_users
    # Each user's stored history is the newest of all their interactions, oldest first.
    inter = tiny.datamodule.data.interactions
    last = inter[inter["user"] == 5]["item"].to_numpy()[-art.history_len :]
    assert art.histories[5][-len(last) :].tolist() == last.tolist()

    module = _module(torch.load(tiny.checkpoint, map_location="cpu", weights_only=False), art.genre_item_mask)
    queries = _queries(art)
    with one_thread():
        fast, reference = (
            Recommender(art).recommend(queries),
            Recommender(art, shared_memory=False).recommend(queries),
        )
        batch = Recommender(art)._batch(queries)
        batch["target"] = torch.zeros(len(queries), dtype=torch.long)
        items, scores = module.recommend(batch, BEAM, BEAM, module.candidate_mask(batch))
    for row, (f, r) in enumerate(zip(fast, reference)):
        expected = items[row][items[row] > 0].tolist()
        assert r.items == expected and f.items == expected, (row, f.items, r.items, expected)
        np.testing.assert_allclose(f.scores, scores[row][: len(expected)].numpy(), atol=1e-4)
        if queries[row].trigger_genre >= 0:  # a channel only shows its genre
            assert all(art.genre_item_mask[queries[row].trigger_genre, i] for i in f.items)


def test_shared_memory_decoder_matches_the_reference_logits(tiny):
    art = load_artifact(tiny.artifact)
    model, decoder = art.model, SharedMemoryDecoder(art.model)
    assert decoder.supported
    batch = Recommender(art)._batch(_queries(art, 3))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad(), one_thread():
        encoded = model.encode(batch)
        prepared = decoder.prepare(encoded)
        for level in range(art.trie.depth):
            beams = 5
            rows = torch.arange(3).repeat_interleave(beams)
            prefix = torch.stack([torch.randint(0, v, (15,), generator=g) for v in model.vocab_sizes[:level]], 1) \
                if level else torch.zeros(15, 0, dtype=torch.long)  # fmt: skip
            expected = model.next_logits({k: v[rows] for k, v in encoded.items()}, prefix)
            torch.testing.assert_close(
                decoder.next_logits(prepared, rows, prefix), expected, atol=1e-5, rtol=1e-4
            )
            shuffled = rows.flip(0)  # not grouped by request: falls back to the reference path
            torch.testing.assert_close(
                decoder.next_logits(prepared, shuffled, prefix),
                model.next_logits({k: v[shuffled] for k, v in encoded.items()}, prefix),
            )


def test_loading_the_artifact_needs_no_training_code(tiny):
    script = (
        "import sys; from nestrec.serve.artifact import load_artifact; from nestrec.serve.engine import Recommender;"
        f"art = load_artifact({str(tiny.artifact)!r}); Recommender(art);"
        "bad = [m for m in ('nestrec.oxygen.module', 'nestrec.oxygen.data', 'nestrec.data.datamodule',"
        " 'nestrec.evaluation', 'pandas') if m in sys.modules]; print('training modules:', bad); assert not bad"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# -- refusals --------------------------------------------------------------------------------------------
def _copy(tiny, tmp_path: Path) -> Path:
    target = tmp_path / "artifact"
    shutil.copytree(tiny.artifact, target)
    return target


def test_loading_refuses_other_versions_and_tampered_files_in_one_line(tiny, tmp_path):
    art = _copy(tiny, tmp_path)
    manifest = json.loads((art / "manifest.json").read_text())
    (art / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    line = _one_line_error(serve_main, [f"artifact={art}"])
    assert "format version 2" in line and "reads version 1" in line and "re-export" in line

    (art / "manifest.json").write_text(json.dumps({**manifest, "registry_version": "0123456789abcdef"}))
    with pytest.raises(ArtifactError, match="registry.json is version .* trained with 0123456789abcdef"):
        load_artifact(art)

    (art / "manifest.json").write_text("[1, 2]")  # valid JSON, not an object
    line = _one_line_error(serve_main, [f"artifact={art}"])
    assert "manifest.json holds a JSON list, not an object" in line

    (art / "manifest.json").write_text(json.dumps(manifest))
    weights = art / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    line = _one_line_error(serve_main, [f"artifact={art}"])
    assert "weights.safetensors does not match its manifest digest" in line
    load_artifact(art, verify=False)  # the digest pass can be skipped (the bytes still parse)

    assert "is not a serving artifact" in _one_line_error(serve_main, [f"artifact={tmp_path}"])
    assert "unknown setting 'prot'" in _one_line_error(serve_main, [f"artifact={art}", "prot=1"])
    assert "max_batch=0 must be >= 1" in _one_line_error(
        serve_main, [f"artifact={tiny.artifact}", "max_batch=0"]
    )


def test_export_refuses_a_registry_the_data_does_not_match(tiny, tmp_path):
    from nestrec.oxygen.sid import SIDRegistry

    checkpoint = torch.load(tiny.checkpoint, map_location="cpu", weights_only=False)
    other, _ = SIDRegistry.build(torch.randn(tiny.datamodule.data.num_items, 8), levels=2, codebook_size=4)
    checkpoint["sid_registry"] = other.state()
    checkpoint["hyper_parameters"]["registry_version"] = other.version
    foreign = tmp_path / "foreign.ckpt"
    torch.save(checkpoint, foreign)
    line = _one_line_error(export_main, [f"checkpoint={foreign}", f"out={tmp_path / 'a'}"])
    assert f"the model was trained with registry {other.version}, the data now tokenises to" in line
    assert not (tmp_path / "a").exists() and not (tmp_path / "a.partial").exists()

    line = _one_line_error(export_main, [f"checkpoint={tiny.checkpoint}", f"out={tiny.artifact}"])
    assert "already exists; pass overwrite=true" in line
    line = _one_line_error(
        export_main, [f"checkpoint={tiny.checkpoint}", f"out={tmp_path / 'b'}", "k.homepage=99"]
    )
    assert "k.homepage=99 must be in 1..min(beam.homepage, max_k) = 8" in line
    line = _one_line_error(
        export_main, [f"checkpoint={tiny.checkpoint}", f"out={tmp_path / 'b'}", "beam.checkout=4"]
    )
    assert "beam for unknown scenario(s) ['checkout']" in line
    assert "give exactly one of" in _one_line_error(export_main, [f"out={tmp_path / 'b'}"])


def test_export_copies_an_instruction_cache_and_checks_its_width(tiny, tmp_path):
    from nestrec.oxygen.cri.cache import CRICache, CRIRecord
    from nestrec.oxygen.text import encode_texts

    def cache(path: Path, vector: np.ndarray) -> Path:
        with CRICache(path) as c:
            c.put_many([CRIRecord(3, 0, 0.0, "test", "v1", "ok", '{"intent": "war films"}', vector)])
        return path

    good = cache(tmp_path / "good.sqlite", encode_texts(["war films"], "hashed")[0].numpy())
    out = export_artifact(
        ExportSettings(checkpoint=str(tiny.checkpoint), out=str(tmp_path / "with-cri"), cri=str(good),
                       beam={"search": 16}, k={"search": 12})
    )  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cri"]["rows"] == 1 and (out / "cri.sqlite").is_file()
    assert manifest["serving"]["beam"]["search"] == 16 and manifest["serving"]["k"]["search"] == 12
    assert load_artifact(out).cri_path == out / "cri.sqlite"
    bad = cache(tmp_path / "bad.sqlite", np.ones(16, dtype=np.float32) / 4)
    line = _one_line_error(
        export_main, [f"checkpoint={tiny.checkpoint}", f"out={tmp_path / 'c'}", f"cri={bad}"]
    )
    assert "holds [16]-d instruction vectors, the text encoder gives 384-d" in line
    # As wide as the encoder's vectors but not its output (MiniLM's are 384-d too): refused as well.
    foreign = cache(tmp_path / "foreign.sqlite", np.ones(384, dtype=np.float32) / np.sqrt(384))
    line = _one_line_error(
        export_main, [f"checkpoint={tiny.checkpoint}", f"out={tmp_path / 'c'}", f"cri={foreign}"]
    )
    assert "instruction vectors were not made by the artifact's 'hashed' text encoder" in line
    assert not (tmp_path / "c").exists()


def test_sharded_checkpoint_exports_the_whole_item_table(tiny, tmp_path):
    """A NestPipe checkpoint (per-rank shard files) exports like a dense one: same recommendations."""
    from nestrec.checkpoint.sharded import save_shards
    from nestrec.sharding.collection import ShardedEmbeddingCollection

    dense = torch.load(tiny.checkpoint, map_location="cpu", weights_only=False)
    module = _module(dense, embedding="sharded")
    [collection] = [m for m in module.modules() if isinstance(m, ShardedEmbeddingCollection)]
    table = dense["state_dict"]["model.item_id.weight"]
    collection.stores["item"].weight.copy_(table)  # world size 1: the only shard holds every row
    checkpoint = {
        **dense,
        "state_dict": module.state_dict(),
        "hyper_parameters": {**dense["hyper_parameters"], "embedding": "sharded"},
    }
    save_shards(
        tmp_path / "sharded.ckpt", checkpoint, [collection], rank=0, world_size=1, barrier=lambda: None
    )
    out = export_artifact(
        ExportSettings(checkpoint=str(tmp_path / "sharded.ckpt"), out=str(tmp_path / "art"))
    )
    art, reference = load_artifact(out), load_artifact(tiny.artifact)
    torch.testing.assert_close(art.model.item_id.weight, reference.model.item_id.weight)
    queries = _queries(art)
    with one_thread():
        assert [r.items for r in Recommender(art).recommend(queries)] == [
            r.items for r in Recommender(reference).recommend(queries)
        ]


def test_settings_parser(monkeypatch):
    settings = parse_settings(["artifact=x", "port=9", "verify=false", "max_wait_ms=2.5"], ServeSettings)
    assert (settings.port, settings.verify, settings.max_wait_ms) == (9, False, 2.5)
    export = parse_settings(["beam.search=64", "k.search=20", "data.cache_dir=/d"], ExportSettings)
    assert export.beam == {"search": 64} and export.k == {"search": 20} and export.data == {"cache_dir": "/d"}
    with pytest.raises(ValueError, match="port='x': input should be a valid integer"):
        parse_settings(["port=x"], ServeSettings)
    with pytest.raises(ValueError, match="unknown setting 'prot'; settings: artifact, host, port"):
        parse_settings(["prot=1"], ServeSettings)
    with pytest.raises(ValueError, match=r"beam\.search='wide': input should be a valid integer"):
        parse_settings(["beam.search=wide"], ExportSettings)
    with pytest.raises(ValueError, match="setting 'port' has no sub-keys"):
        parse_settings(["port.a=1"], ServeSettings)
    # The environment sets defaults; the command line wins over it.
    monkeypatch.setenv("NESTREC_SERVE_PORT", "8123")
    monkeypatch.setenv("NESTREC_SERVE_MAX_BATCH", "4")
    settings = parse_settings(["port=9"], ServeSettings)
    assert (settings.port, settings.max_batch) == (9, 4)
    monkeypatch.setenv("NESTREC_SERVE_MAX_BATCH", "many")
    with pytest.raises(ValueError, match="max_batch='many': input should be a valid integer"):
        parse_settings([], ServeSettings)


def test_an_rl_post_training_checkpoint_exports_like_its_policy(tiny, tmp_path):
    """A subclass checkpoint (SA-GCPO) carries extra hyper-parameters; export reads only the policy."""
    from nestrec.oxygen.align import SAGCPOModule

    dense = torch.load(tiny.checkpoint, map_location="cpu", weights_only=False)
    hparams = {k: v for k, v in dense["hyper_parameters"].items() if k != "registry_version"}
    reward = {s: {"weights": {"format": 1.0}, "value": "watch"} for s in SCENARIO_KINDS}
    module = SAGCPOModule(
        **hparams,
        registry_state=dense["sid_registry"],
        group_size=4,
        method="sagcpo",
        reward_scenarios=reward,
    )
    module.load_state_dict(dense["state_dict"], strict=True)
    checkpoint = {**dense, "state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    assert checkpoint["hyper_parameters"]["method"] == "sagcpo"
    torch.save(checkpoint, tmp_path / "rl.ckpt")
    out = export_artifact(ExportSettings(checkpoint=str(tmp_path / "rl.ckpt"), out=str(tmp_path / "art")))
    art, reference = load_artifact(out), load_artifact(tiny.artifact)
    queries = _queries(art)
    with one_thread():
        assert [r.items for r in Recommender(art).recommend(queries)] == [
            r.items for r in Recommender(reference).recommend(queries)
        ]


def test_channel_without_genres_is_a_clear_422_not_a_crash(tiny):
    """An artifact whose catalogue has no genres: the schema takes any string, resolve must refuse."""
    from nestrec.serve.instructions import InstructionSource
    from nestrec.serve.resolve import RequestError, resolve
    from nestrec.serve.schema import request_model

    art = load_artifact(tiny.artifact)
    art.genres = []
    model = request_model(art.scenarios, art.genres, art.num_items, 100, 512)
    request = model(scenario="channel", user=1, genre="Drama")
    with pytest.raises(RequestError, match="scenario 'channel' is not available: .* no genres"):
        resolve(request, art, InstructionSource("hashed", art.text_dim))
    assert resolve(model(scenario="homepage", user=1), art, InstructionSource("hashed", art.text_dim)).query
