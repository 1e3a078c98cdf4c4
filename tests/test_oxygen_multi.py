"""The multi-stage OxygenREC recipe end to end on the fixture, stage reuse, and the SA-GCPO module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import run_nestrec
from nestrec.errors import ConfigError
from nestrec.oxygen.align import SAGCPOModule
from nestrec.oxygen.ranker import UnifiedRankerModule
from nestrec.oxygen.sid import SIDRegistry
from nestrec.serve.artifact import load_artifact
from nestrec.wandb_offline import offline_runs

FIXTURE = [
    "recipe=oxygenrec_multi", "data=oxygen_fixture", "stages.cri.backend=rules", "stages.cri.max_users=30",
    "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "stages.align.trainer.limit_train_batches=4",
    "stages.align.trainer.limit_val_batches=2", "stages.ranker.trainer.limit_val_batches=2",
]  # fmt: skip


@pytest.mark.slow
def test_oxygenrec_multi_runs_every_stage_and_reuses_finished_ones(tmp_path):
    run_dir = tmp_path / "run"
    env = {"NESTREC_DATA_DIR": str(tmp_path / "data")}
    args = [*FIXTURE, "logger=wandb", f"hydra.run.dir={run_dir}"]
    first = run_nestrec(args, tmp_path, env_extra=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["stages"]) == {"cri", "pretrain", "ranker", "align"}
    for stage in ("pretrain", "align"):
        for scenario in ("homepage", "channel", "related", "search", "overall"):
            for metric in ("hr@10", "recall@10", "ndcg@10"):
                assert 0.0 <= summary["metrics"][f"{stage}/test/{scenario}/{metric}"] <= 1.0
    for key in ("rl/gate_weight", "rl/suppressed_fraction", "rl/legal_rate", "rl/reward_relevance"):
        assert f"align/{key}" in summary["metrics"], key
    assert summary["metrics"]["align/rl/legal_rate"] == 1.0  # constrained rollouts are legal by construction
    assert summary["stages"]["cri"]["stats"]["generated"] > 0
    assert summary["data"]["cri_coverage"]["test"] > 0
    assert "SA-GCPO NDCG@10" in (run_dir / "comparison.md").read_text()
    # One offline W&B run per Lightning stage: its own job_type, one group for the run, the whole
    # config, its checkpoint as an Artifact; the align run also holds the comparison plot + table.
    runs = {}
    for stage in ("pretrain", "ranker", "align"):
        [run] = offline_runs(summary["stages"][stage]["dir"])
        runs[run.job_type] = run
    assert set(runs) == {"pretrain", "ranker", "align"}
    assert len({r.group for r in runs.values()}) == 1 and "oxygenrec_multi" in runs["align"].group
    for stage, run in runs.items():
        assert {"model", "data", "stages", "trainer", "reward"} <= set(run.config), run.config.keys()
        assert (f"oxygenrec_multi-{stage}-checkpoint", "model") in run.artifacts, run.artifacts
        assert "data=oxygen_fixture" in run.tags
    assert ("oxygenrec_multi-comparison", "results") in runs["align"].artifacts
    assert runs["align"].images and any(k.startswith("comparison_plot") for k in runs["align"].history_keys)
    assert (run_dir / "comparison.png").stat().st_size > 10_000
    assert "[nestrec] upload them with: wandb sync " in first.stdout
    # The aligned model is exported for serving, loads as an artifact and is a W&B Artifact too.
    assert ("oxygenrec_multi-serving", "serving-model") in runs["align"].artifacts
    served = load_artifact(run_dir / "serving", torch.device("cpu"))
    assert served.manifest["source"]["checkpoint"] == str(
        Path(summary["stages"]["align"]["checkpoint"]).resolve()
    )
    assert f"serve it with: python -m nestrec.serve artifact={run_dir / 'serving'}" in first.stdout

    # Forcing the ranker re-runs it and what depends on it (align), and reuses the rest.
    second = run_nestrec([*args, "stages.force=[ranker]"], tmp_path, env_extra=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    for stage in ("cri", "pretrain"):
        assert f"stage {stage}: finished earlier, reusing" in second.stdout
    for stage in ("ranker", "align"):
        assert f"stage {stage}: running" in second.stdout
    again = json.loads((run_dir / "summary.json").read_text())
    assert (
        again["metrics"]["pretrain/test/overall/ndcg@10"]
        == summary["metrics"]["pretrain/test/overall/ndcg@10"]
    )


@pytest.mark.slow
def test_oxygenrec_multi_on_two_processes_under_nestpipe(tmp_path):
    """Every stage on 2 gloo ranks: the cri job runs once (before the launcher starts rank 1, which
    then reuses it), the Lightning stages run on both ranks, rank 0 writes the summary."""
    run_dir = tmp_path / "run"
    args = [*FIXTURE, "strategy=nestpipe", "trainer.devices=2", "+strategy.find_unused_parameters=true",
            "logger=csv", f"hydra.run.dir={run_dir}"]  # fmt: skip
    result = run_nestrec(args, tmp_path, env_extra={"NESTREC_DATA_DIR": str(tmp_path / "data")})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("stage cri: running") == 1
    assert "stage cri: finished earlier, reusing" in result.stdout  # rank 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stages"]["cri"]["stats"]["generated"] > 0
    assert 0.0 <= summary["metrics"]["align/test/overall/ndcg@10"] <= 1.0


def test_bad_stage_and_reward_config_fail_with_one_line_errors(tmp_path):
    env = {"NESTREC_DATA_DIR": str(tmp_path / "data")}
    result = run_nestrec([*FIXTURE, "stages.order=[cri,pretrain,magic]"], tmp_path, env_extra=env)
    assert result.returncode == 2 and "unknown stage(s) ['magic']" in result.stderr, result.stderr[-2000:]
    result = run_nestrec([*FIXTURE, "+reward.scenarios.homepage.weights.gmv=1"], tmp_path, env_extra=env)
    assert result.returncode == 2 and "unknown term(s) ['gmv']" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "stage cri" not in result.stdout  # failed before any stage


# -- the SA-GCPO module on a tiny synthetic case -------------------------------------------------------
REWARDS = {
    s: {
        "weights": {"format": 1.0, "relevance": 1.0, "ranking": 1.0, "diversity": 0.2},
        "value": "watch + like",
    }
    for s in ("homepage", "channel", "related", "search")
}


def _policy(method: str, **kwargs) -> SAGCPOModule:
    torch.manual_seed(0)
    registry = SIDRegistry.build(torch.randn(24, 8), levels=2, codebook_size=4, policy="disambiguate")[0]
    ranker = UnifiedRankerModule(registry.num_items, num_genres=2, profile_sizes=[], recent_len=4)
    settings = dict(
        num_items=registry.num_items, registry_state=registry.state(), text_dim=8, num_genres=2, profile_sizes=[],
        recent_len=4, long_len=6, d_model=32, ffn=64, dropout=0.0, igr_k=2, beam={"homepage": 5}, ks=(1, 5),
        method=method, group_size=4, reward_scenarios=REWARDS, item_text=torch.randn(25, 8), ranker=ranker,
    )  # fmt: skip
    return SAGCPOModule(**{**settings, **kwargs})


def _batch(n: int = 6, items: int = 24) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "history": torch.randint(1, items + 1, (n, 10), generator=g),
        "target": torch.randint(1, items + 1, (n,), generator=g),
        "scenario": torch.tensor([0, 1, 2, 3, 0, 0])[:n],
        "trigger_item": torch.tensor([0, 0, 3, 0, 0, 0])[:n],
        "trigger_genre": torch.tensor([-1, 1, -1, -1, -1, -1])[:n],
        "reasoning": torch.randn(n, 8, generator=g),
        "profile": torch.zeros(n, 0, dtype=torch.long),
    }


@pytest.mark.parametrize("method", ["sagcpo", "sapo", "gspo", "grpo"])
@pytest.mark.parametrize("rollout", ["beam", "sample_unconstrained"])
def test_one_alignment_step_per_method_updates_only_the_policy(method, rollout):
    module = _policy(method, rollout=rollout)
    batch = _batch()
    item_mask = module.candidate_mask(batch)
    tokens, items, valid = module.rollout(module.model, module.model.encode(batch), batch, item_mask)
    depth = module.trie.depth
    assert tokens.shape == (6, 4, depth)
    if rollout == "beam":
        assert valid.all() and (items > 0).all()
        legal = {tuple(c) for c in module.registry.codes.tolist()}
        assert all(tuple(t) in legal for t in tokens.reshape(-1, depth).tolist())
    logged = {}
    module.optimizers = lambda: module._optimizer
    module._optimizer = module.configure_optimizers()
    module.manual_backward = lambda loss: loss.backward()
    module.log = lambda k, v, **_: logged.__setitem__(k, v)
    module.log_dict = lambda d, **_: logged.update(d)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.training_step(batch, 0)
    changed = {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}
    assert any(k.startswith("model.") for k in changed)
    assert not any(k.startswith("ranker.") for k in changed)
    assert 0.0 <= float(logged["rl/suppressed_fraction"]) <= 1.0
    if method in ("sagcpo", "sapo"):
        assert float(logged["rl/gate_weight"]) == pytest.approx(
            1.0, abs=0.05
        )  # ratios near 1 after 2 small steps
    if method != "sagcpo":
        assert float(logged["rl/suppressed_fraction"]) == 0.0


def test_alignment_config_errors():
    with pytest.raises(ConfigError, match="unknown policy method"):
        _policy("ppo")
    with pytest.raises(ConfigError, match="group_size"):
        _policy("sagcpo", group_size=1)
    with pytest.raises(ConfigError, match="unknown rollout"):
        _policy("sagcpo", rollout="greedy")


def test_the_logged_item_joins_every_group_once():
    module = _policy("sagcpo")
    batch = _batch()
    tokens, items, valid = module.rollout(module.model, module.model.encode(batch), batch, None)
    tokens, items, valid = module._with_logged_item(batch, tokens, items, valid)
    target = batch["target"].unsqueeze(1)
    assert ((items == target).sum(1) >= 1).all()
    rows, cols = (items == target).nonzero(as_tuple=True)
    assert torch.equal(tokens[rows, cols], module.model.sid_codes[batch["target"][rows]])
    assert valid[rows, cols].all()
