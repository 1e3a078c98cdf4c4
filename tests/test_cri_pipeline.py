"""The slow-thinking CRI job and its cache: leakage, failures, resume, corruption."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import torch

from nestrec.oxygen.cri.backends import BackendError
from nestrec.oxygen.cri.cache import CRICache
from nestrec.oxygen.cri.pipeline import CRIJob, build_context, plan_windows
from nestrec.oxygen.cri.prompt import (
    PROMPT_VERSION,
    InvalidInstruction,
    RuleBasedReasoner,
    build_prompt,
    parse_instruction,
)
from nestrec.oxygen.data import OxygenDataModule

WINDOW = 300


@pytest.fixture(scope="module")
def datamodule():
    dm = OxygenDataModule(dataset="fixture", text_encoder="hashed", samples_per_user=6, sid_codebook=8)
    dm.setup()
    return dm


def _encoder(texts):
    from nestrec.oxygen.text import encode_texts

    return encode_texts(texts, "hashed")


class CountingBackend(RuleBasedReasoner):
    """The rule-based reasoner, counting the prompts it answers (and optionally dying mid-way)."""

    def __init__(self, die_after: int | None = None):
        self.calls, self.die_after = 0, die_after

    def generate(self, prompts):
        if self.die_after is not None and self.calls + len(prompts) > self.die_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += len(prompts)
        return super().generate(prompts)


def _job(dm, backend, path, **kwargs):
    cache = CRICache(path, backend.name, PROMPT_VERSION)
    return CRIJob(backend, cache, _encoder, dm.data, WINDOW, batch_size=4, progress=False, **kwargs), cache


def test_context_only_sees_behaviour_before_the_window(datamodule):
    dm = datamodule
    keys = plan_windows(dm.split, max_users=10, window_seconds=WINDOW)
    assert keys and len({u for u, _ in keys}) == 10
    inter = dm.data.interactions
    titles = dm.data.items.set_index("item")["title"]
    for user, window in keys:
        ctx = build_context(dm.data, user, window, WINDOW, recent=50)
        rows = inter[inter["user"] == user]
        allowed = set(titles.loc[rows[rows["timestamp"] < ctx.as_of]["item"]])
        assert {r["title"] for r in ctx.recent} <= allowed
    # Every user's test-target window is planned, and its context never contains the test item.
    test = dict(
        zip(dm.split.test.users.tolist(), zip(dm.split.test.timestamps.tolist(), dm.split.test.targets))
    )
    for user, window in keys:
        ts, target = test[user]
        if window == ts // WINDOW:
            ctx = build_context(dm.data, user, window, WINDOW, recent=1000)
            assert titles.loc[int(target)] not in {r["title"] for r in ctx.recent} or (
                (inter[(inter.user == user) & (inter.item == target)]["timestamp"] < ctx.as_of).any()
            )


def test_as_of_join_never_uses_a_future_instruction(datamodule, tmp_path):
    dm = datamodule
    job, cache = _job(dm, RuleBasedReasoner(), tmp_path / "cri.sqlite")
    stats = job.run(plan_windows(dm.split, max_users=12, window_seconds=WINDOW, train_windows=3))
    assert stats.generated == stats.planned > 0 and stats.fallbacks == 0
    # one-target rows: the CRI windows cover each user's last targets (dense rows join as of their first)
    fresh = OxygenDataModule(dataset="fixture", text_encoder="hashed", samples_per_user=6, sid_codebook=8,
                             teacher_forcing="single")  # fmt: skip
    fresh.setup()
    coverage = fresh.attach_instructions(str(tmp_path / "cri.sqlite"))
    assert coverage["test"] > 0 and coverage["train"] > 0
    search = 3
    checked = 0
    for name in ("train", "test"):
        t = fresh._tensors[name]
        for row in range(len(t["target"])):
            user, when = int(t["user"][row]), float(t["time"][row])
            record = cache.latest(user, when)
            vector = fresh._text_table[int(t["query_index"][row])]
            if int(t["scenario"][row]) == search:
                continue  # search rows keep their query as the instruction
            if record is None:
                assert not vector.any()  # nothing cached yet at this time: the learned default
                continue
            assert record.user == user and record.as_of <= when  # never an instruction from the future
            assert torch.equal(vector, torch.from_numpy(record.vector))
            later = [r for r in cache.records() if r.user == user and r.as_of > when]
            assert all(
                not torch.equal(vector, torch.from_numpy(r.vector)) or r.text == record.text for r in later
            )
            checked += 1
    assert checked > 0
    with pytest.raises(RuntimeError, match="already attached"):
        fresh.attach_instructions(str(tmp_path / "cri.sqlite"))


class FlakyBackend:
    """Errors on some prompts, invalid output on others, valid JSON otherwise."""

    name = "flaky:test"

    def __init__(self):
        self.calls = 0

    def generate(self, prompts):
        self.calls += 1
        if len(prompts) > 1:
            raise BackendError("batch endpoint down")
        user = json.loads(prompts[0][1].split("\n")[1])["profile"].get("gender", "")
        if user == "F":
            return ["I think they want comedies!"]  # never valid: ends as the default instruction
        return [json.dumps({"intent": "more of the same", "categories": ["Drama"]})]


def test_backend_failures_and_invalid_output_fall_back_and_are_counted(datamodule, tmp_path):
    dm = datamodule
    keys = plan_windows(dm.split, max_users=8, window_seconds=WINDOW)
    backend = FlakyBackend()
    job, cache = _job(dm, backend, tmp_path / "cri.sqlite", max_retries=2)
    stats = job.run(keys)
    assert stats.planned == len(keys) == stats.generated + stats.fallbacks
    assert stats.backend_errors >= 1 and stats.fallbacks > 0 and stats.generated > 0
    # Batches fail as a whole, then each prompt gets 2 bounded retries: F users answer invalid twice.
    assert stats.invalid_outputs == stats.fallbacks * 2 and stats.backend_errors == len(
        range(0, len(keys), 4)
    )
    rows = cache.records()
    assert max(r.attempts for r in rows) == 3
    assert {r.status for r in rows} == {"ok", "fallback"}
    assert all(r.vector is None for r in rows if r.status == "fallback")
    # Fallback rows are "done" (not retried forever on resume) and never joined: a failed window
    # keeps the user's previous good instruction in force, or the learned default if there is none.
    assert job.run(keys).cached == len(keys)
    for r in rows:
        if r.status != "fallback":
            continue
        joined = cache.latest(r.user, r.as_of)
        earlier_ok = [o for o in rows if o.user == r.user and o.status == "ok" and o.as_of <= r.as_of]
        if earlier_ok:
            assert joined.key == max(earlier_ok, key=lambda o: o.as_of).key
        else:
            assert joined is None


def test_killed_job_resumes_without_recomputing_cached_windows(datamodule, tmp_path):
    dm = datamodule
    keys = plan_windows(dm.split, max_users=10, window_seconds=WINDOW)
    dying = CountingBackend(die_after=9)  # batches of 4: two batches commit, the third dies
    job, cache = _job(dm, dying, tmp_path / "cri.sqlite")
    with pytest.raises(KeyboardInterrupt):
        job.run(keys)
    assert len(cache.done_keys()) == 8
    resumed = CountingBackend()
    job, cache = _job(dm, resumed, tmp_path / "cri.sqlite")
    stats = job.run(keys)
    assert stats.cached == 8 and resumed.calls == len(keys) - 8
    assert cache.done_keys() == set(keys)


def test_corrupted_row_is_detected_skipped_and_regenerated(datamodule, tmp_path):
    dm = datamodule
    keys = plan_windows(dm.split, max_users=4, window_seconds=WINDOW)
    path = tmp_path / "cri.sqlite"
    job, cache = _job(dm, RuleBasedReasoner(), path)
    job.run(keys)
    user, window = keys[0]
    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE cri SET text = ? WHERE user = ? AND window = ?", ('{"intent": "tampered"}', user, window)
        )
    reader = CRICache(path)
    assert reader.verify() == [(user, window)]
    assert all(r.key != (user, window) for r in reader.records())
    backend = CountingBackend()
    job, cache = _job(dm, backend, path)
    stats = job.run(keys)
    assert stats.corrupt_regenerated == 1 and backend.calls == 1
    assert CRICache(path).verify() == []
    with sqlite3.connect(path) as db:  # a truncated vector blob is corruption too, not a crash
        db.execute("UPDATE cri SET vector = X'0102' WHERE user = ? AND window = ?", (user, window))
    assert CRICache(path).verify() == [(user, window)]


def test_output_validation():
    ok = parse_instruction(
        'Sure! ```json\n{"intent": "light comedy", "categories": ["Comedy"]}\n``` hope it helps'
    )
    assert ok["categories"] == ["Comedy"]
    for bad in (
        "no json here",
        '{"intent": "x"',
        '{"intent": "ok ok", "categories": []}',
        '{"categories": ["A"]}',
    ):
        with pytest.raises(InvalidInstruction):
            parse_instruction(bad)


def test_rule_based_reasoner_is_deterministic_and_valid(datamodule):
    dm = datamodule
    user, window = plan_windows(dm.split, max_users=1, window_seconds=WINDOW)[0]
    prompt = build_prompt(build_context(dm.data, user, window, WINDOW))
    a, b = RuleBasedReasoner().generate([prompt]), RuleBasedReasoner().generate([prompt])
    assert a == b
    parsed = parse_instruction(a[0])
    assert set(parsed["categories"]) <= set(dm.data.genre_vocab) | {"Drama"}
    assert np.isfinite(_encoder([parsed["intent"]]).numpy()).all()
