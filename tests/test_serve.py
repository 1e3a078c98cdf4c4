"""The recommendation service, end to end: a real uvicorn process on a loopback port.

The artifact is the tiny model of ``tests/test_export.py``; an instruction cache gives a few users
cached reasoning vectors. Every test talks HTTP to the same process (started once), so "the service
keeps serving" is checked by the tests that follow the bad requests as well as explicitly.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from prometheus_client.parser import text_string_to_metric_families

from nestrec.errors import UserInputError
from nestrec.oxygen.cri.cache import CRICache, CRIRecord
from nestrec.oxygen.cri.prompt import instruction_text
from nestrec.oxygen.text import encode_texts
from nestrec.serve import batching
from nestrec.serve.__main__ import main as serve_main
from nestrec.serve.batching import DeadlineExceeded, MicroBatcher, Overloaded
from nestrec.serve.instructions import InstructionSource
from test_export import Tiny, _one_line_error, tiny  # noqa: F401  (the session fixture)

SCENARIOS = ("homepage", "channel", "related", "search")
# Unknown to the artifact (cold start), with instruction vectors A, B and A again.
COLD_A, COLD_B, COLD_A2, LATE = 900_001, 900_002, 900_003, 900_004


def _record(user: int, intent: str, window: int = 0, vector: np.ndarray | None = None) -> CRIRecord:
    """An instruction as the slow-thinking job stores it: its JSON text, and that text through the
    artifact's encoder (``vector`` overrides it, e.g. with another encoder's output)."""
    text = json.dumps({"intent": intent})
    if vector is None:
        vector = encode_texts([instruction_text(json.loads(text))], "hashed")[0].numpy()
    return CRIRecord(user, window, float(window), "test", "v1", "ok", text, vector)


@pytest.fixture(scope="module")
def cri(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cri") / "cri.sqlite"
    with CRICache(path) as cache:
        cache.put_many(
            [_record(COLD_A, "horror 1990s"), _record(COLD_B, "comedy romance 1950s"),
             _record(COLD_A2, "horror 1990s"), _record(3, "drama"), _record(4, "war")]
        )  # fmt: skip
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def service(tiny: Tiny, cri: Path, tmp_path_factory):  # noqa: F811
    """``python -m nestrec.serve`` on 127.0.0.1:<free port>; yields (base URL, catalogue)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nestrec.serve", f"artifact={tiny.artifact}", f"port={port}", f"cri={cri}",
             "cri_refresh_s=1", "deadline_ms=30000", "max_batch=16"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the service exited with {proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the service did not become ready:\n{log.read_text()}")
            time.sleep(0.2)
        catalogue = json.loads((tiny.artifact / "catalogue.json").read_text())
        yield base, catalogue
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode in (0, -15), log.read_text()


def _post(base: str, body, **kwargs) -> httpx.Response:
    if isinstance(body, (dict, list)):
        return httpx.post(f"{base}/v1/recommend", json=body, timeout=30, **kwargs)
    return httpx.post(
        f"{base}/v1/recommend", content=body, headers={"content-type": "application/json"}, timeout=30
    )


def _items(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    return [it["item"] for it in response.json()["items"]]


def _request(scenario: str, **extra) -> dict:
    body = {"scenario": scenario, **extra}
    if scenario == "channel":
        body.setdefault("genre", "Drama")
    if scenario == "search":
        body.setdefault("query", "drama romance 1990s")
    return body


# -- recommendations ---------------------------------------------------------------------------------
def test_every_scenario_returns_real_catalogue_items(service):
    base, catalogue = service
    by_id = {row["item"]: row for row in catalogue["items"]}
    model = httpx.get(f"{base}/v1/model", timeout=10).json()
    assert model["scenarios"] == list(SCENARIOS) and model["items"] == len(by_id)
    for scenario in SCENARIOS:
        for user in (0, 7, 42):
            response = _post(base, _request(scenario, user=user))
            body = response.json()
            items = _items(response)
            assert 0 < len(items) <= body["k"] == model["serving"]["k"][scenario]
            assert len(set(items)) == len(items)
            for it in body["items"]:
                row = by_id[it["item"]]  # a real catalogue item, described as the catalogue says
                assert (it["item_id"], it["title"], it["genres"]) == (
                    row["item_id"],
                    row["title"],
                    row["genres"],
                )
                assert np.isfinite(it["score"])
            scores = [it["score"] for it in body["items"]]
            assert scores == sorted(scores, reverse=True)
            assert body["history_source"] == "stored" and not body["cold_start"]
            if scenario == "channel":
                assert all("Drama" in it["genres"] for it in body["items"])
            assert body["instruction"] == {"search": "query"}.get(scenario, "default")

    history = [1, 2, 3, 4, 5]
    response = _post(base, {"scenario": "homepage", "history": history, "exclude_history": True, "k": 8})
    assert not set(_items(response)) & set(history) and response.json()["history_source"] == "request"
    related = _post(base, {"scenario": "related", "trigger_item": 9, "history": history})
    assert related.status_code == 200


def test_exclude_history_covers_the_whole_history_not_only_the_models_window(service, tiny):  # noqa: F811
    """The model reads the newest recent_len + long_len (16) items; exclusion must cover them all."""
    base, catalogue = service
    num_items = len(catalogue["items"])
    window = 16
    history = list(range(1, 61))  # 60 items: 44 older than the window
    body = {"scenario": "homepage", "history": history, "exclude_history": True, "beam": 64, "k": 64}
    items = _items(_post(base, body))
    assert items and not set(items) & set(history), sorted(set(items) & set(history))
    # Without exclusion the older items are fair game (so the check above is not vacuous).
    assert set(_items(_post(base, {**body, "exclude_history": False}))) & set(history[:-window])
    assert len(items) <= num_items - len(history)

    # A known user without a request history: everything they interacted with, not the stored window.
    inter = tiny.datamodule.data.interactions
    counts = inter.groupby("user")["item"].nunique()
    user = int(counts.idxmax())
    seen = set(inter[inter["user"] == user]["item"].tolist())
    assert len(seen) > window
    response = _post(
        base, {"scenario": "homepage", "user": user, "exclude_history": True, "beam": 64, "k": 64}
    )
    assert response.json()["history_source"] == "stored"
    assert _items(response) and not set(_items(response)) & seen


def test_results_are_deterministic_alone_and_under_concurrency(service):
    base, _ = service
    bodies = [_request(s, user=u) for s in SCENARIOS for u in (1, 2, 3)]
    first = [_items(_post(base, b)) for b in bodies]
    assert first == [_items(_post(base, b)) for b in bodies]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            return await asyncio.gather(*(client.post("/v1/recommend", json=b) for b in bodies * 2))

    responses = asyncio.run(burst())
    assert [_items(r) for r in responses] == first * 2  # batched with others, the same answer
    assert max(r.json()["batch_size"] for r in responses) > 1  # concurrent requests did share passes


def test_cached_instruction_changes_the_result_when_it_should(service):
    base, _ = service
    history = [11, 12, 13, 14]  # same history and (unknown) profile: only the instruction differs
    a, b, a2 = (
        _post(base, {"scenario": "homepage", "user": u, "history": history})
        for u in (COLD_A, COLD_B, COLD_A2)
    )
    assert {r.json()["instruction"] for r in (a, b, a2)} == {"cached"}
    assert _items(a) == _items(a2)  # the same vector: the same list
    assert [it["score"] for it in a.json()["items"]] != [it["score"] for it in b.json()["items"]]
    differs = [
        _items(_post(base, {"scenario": s, "user": COLD_A, "history": history, **extra}))
        != _items(_post(base, {"scenario": s, "user": COLD_B, "history": history, **extra}))
        for s, extra in (("homepage", {"k": 8}), ("related", {}), ("channel", {"genre": "Comedy"}))
    ]
    assert _items(a) != _items(b) or any(differs), "two instructions gave identical lists everywhere"

    # Turned off per request, or a user without a cached row: the learned default.
    off = _post(base, {"scenario": "homepage", "user": COLD_A, "history": history, "use_instruction": False})
    assert off.json()["instruction"] == "default"
    default = _post(base, {"scenario": "homepage", "user": 999_999, "history": history})
    assert default.json()["instruction"] == "default" and _items(default) == _items(off)
    # search: the query is the instruction; the cached one does not apply.
    s1 = _post(base, _request("search", user=COLD_A, history=history))
    s2 = _post(base, _request("search", user=COLD_B, history=history))
    assert s1.json()["instruction"] == "query" and _items(s1) == _items(s2)


def test_new_cached_instructions_are_picked_up_without_a_restart(service, cri):
    base, _ = service
    body = {"scenario": "homepage", "user": LATE, "history": [3, 4]}
    assert _post(base, body).json()["instruction"] == "default"
    with CRICache(cri) as cache:
        cache.put_many([_record(LATE, "western 1960s")])
    deadline = time.time() + 20
    while _post(base, body).json()["instruction"] != "cached":
        assert time.time() < deadline, "the service never re-read the instruction cache"
        time.sleep(0.3)


def test_unknown_user_takes_the_cold_start_path(service):
    base, _ = service
    for scenario in ("homepage", "channel", "search"):
        body = _post(base, _request(scenario, user=123_456)).json()
        assert body["cold_start"] and body["history_source"] == "none" and body["items"]
    anonymous = _post(base, {"scenario": "homepage"}).json()
    assert anonymous["cold_start"] and anonymous["user"] is None and anonymous["items"]
    # related has nothing to relate to without a trigger or history
    response = _post(base, {"scenario": "related", "user": 123_456})
    assert (
        response.status_code == 422
        and "needs trigger_item or a non-empty history" in response.json()["detail"]
    )


# -- bad requests ------------------------------------------------------------------------------------
BAD = [
    (
        {"scenario": "checkout", "user": 1},
        "scenario: Input should be 'homepage', 'channel', 'related' or 'search'",
    ),
    ({"user": 1}, "scenario: Field required"),
    ({"scenario": "homepage", "k": 0}, "k: Input should be greater than or equal to 1"),
    ({"scenario": "homepage", "k": 101}, "k: Input should be less than or equal to 100"),
    ({"scenario": "homepage", "beam": 0}, "beam: Input should be greater than or equal to 1"),
    ({"scenario": "homepage", "beam": 513}, "beam: Input should be less than or equal to 512"),
    ({"scenario": "homepage", "k": 9}, "k (9) must not exceed beam (8)"),
    ({"scenario": "homepage", "k": 20, "beam": 10}, "k (20) must not exceed beam (10)"),
    ({"scenario": "homepage", "user": -1}, "user: Input should be greater than or equal to 0"),
    ({"scenario": "homepage", "history": [1, 10_000]}, "history.1: Input should be less than or equal to 80"),
    ({"scenario": "homepage", "history": "1,2"}, "history: Input should be a valid list"),
    ({"scenario": "channel"}, "scenario 'channel' needs a genre"),
    ({"scenario": "channel", "genre": "Opera"}, "genre: Input should be"),
    ({"scenario": "homepage", "genre": "Drama"}, "genre is only meaningful for scenario 'channel'"),
    ({"scenario": "search"}, "scenario 'search' needs a non-blank query"),
    ({"scenario": "search", "query": "   "}, "scenario 'search' needs a non-blank query"),
    ({"scenario": "homepage", "query": "x"}, "query is only meaningful for scenario 'search'"),
    ({"scenario": "homepage", "trigger_item": 3}, "trigger_item is only meaningful for scenario 'related'"),
    ({"scenario": "homepage", "usr": 1}, "usr: Extra inputs are not permitted"),
    ({"scenario": "homepage", "deadline_ms": 0}, "deadline_ms: Input should be greater than or equal to 1"),
    ([], "the body must be a JSON object"),
    (b'{"scenario": "homepage", ', "malformed JSON body"),
    (b"not json at all", "malformed JSON body"),
    (b"", "the request body is empty"),
]


def test_bad_requests_get_4xx_with_a_clear_message_and_the_service_keeps_serving(service):
    base, _ = service
    for body, message in BAD:
        response = _post(base, body)
        assert response.status_code == 422, (body, response.status_code, response.text)
        payload = response.json()
        text = payload.get("message") or payload["detail"]
        assert message in text, (body, text)
        assert "\n" not in text
    form = httpx.post(
        f"{base}/v1/recommend", content=b"scenario=homepage", timeout=10
    )  # no JSON content type
    assert form.status_code == 422 and "JSON object" in form.json()["message"]
    assert httpx.get(f"{base}/v1/recommend", timeout=10).status_code == 405
    assert httpx.get(f"{base}/nope", timeout=10).status_code == 404
    assert httpx.get(f"{base}/healthz", timeout=10).json() == {"status": "ok"}
    assert _items(_post(base, _request("homepage", user=1)))


def test_an_oversized_body_gets_413_declared_or_streamed(service):
    base, _ = service
    limit = httpx.get(f"{base}/v1/model", timeout=10).json()["max_body_bytes"]
    assert limit == 1 << 20  # the default
    padding = " " * limit  # valid JSON, only too large
    big = f'{{"scenario": "homepage", "user": 1}}{padding}'.encode()
    response = _post(base, big)  # with Content-Length: refused before the body is read
    assert response.status_code == 413, response.text
    assert response.json() == {
        "detail": f"request body of {len(big)} bytes exceeds the {limit}-byte limit (the service's max_body_bytes)"
    }

    def chunks():  # no Content-Length (chunked): counted while it streams in
        yield b'{"scenario": "homepage", "user": 1}'
        for _ in range(20):
            yield b" " * (limit // 16)

    streamed = httpx.post(
        f"{base}/v1/recommend", content=chunks(), headers={"content-type": "application/json"}, timeout=30
    )
    assert streamed.status_code == 413 and "exceeds the" in streamed.json()["detail"], streamed.text
    small = b'{"scenario": "homepage", "user": 1}' + b" " * 1000
    assert _items(_post(base, small))  # under the limit (and the service keeps serving)

    def small_chunks():
        yield b'{"scenario": "homepage",'
        yield b' "user": 1}'

    assert _items(
        httpx.post(f"{base}/v1/recommend", content=small_chunks(), headers={"content-type": "application/json"},
                   timeout=30)
    )  # fmt: skip


def test_a_missed_deadline_is_a_504_with_a_message(service):
    base, _ = service
    response = _post(base, {"scenario": "homepage", "user": 1, "beam": 512, "k": 100, "deadline_ms": 1})
    assert response.status_code == 504 and "deadline exceeded" in response.json()["detail"]
    assert _items(_post(base, _request("homepage", user=1)))


def test_metrics_count_requests_and_latency(service):
    base, _ = service
    _post(base, _request("homepage", user=1))
    _post(base, {"scenario": "nope"})
    text = httpx.get(f"{base}/metrics", timeout=10).text
    assert "# TYPE nestrec_http_request_duration_seconds histogram" in text
    # Read back with Prometheus' own parser: what a scraper would see.
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("nestrec_http_requests_total", method="POST", route="/v1/recommend", code="200") >= 1
    assert value("nestrec_http_requests_total", method="POST", route="/v1/recommend", code="422") >= 1
    assert value("nestrec_http_request_duration_seconds_bucket", route="/v1/recommend", le="+Inf") >= 2
    assert value("nestrec_recommendations_total", scenario="homepage", outcome="ok") >= 1
    assert value("nestrec_batch_size_count") >= 1 and value("nestrec_queue_depth") >= 0
    assert value("nestrec_uptime_seconds") > 0
    [info] = [labels for name, labels in samples if name == "nestrec_info"]
    assert dict(info)["model_version"]


def test_openapi_fuzzing_finds_no_server_errors(service):
    """Schemathesis generates valid and invalid requests from the published OpenAPI schema."""
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import response_schema_conformance

    base, _ = service
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    checked = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        has_input = operation.method.upper() == "POST"  # the GETs take no input to make invalid
        examples = 40 if has_input else 3
        modes = (
            (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if has_input else (GenerationMode.POSITIVE,)
        )
        for mode in modes:

            @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))  # fmt: skip
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case) -> None:
                response = case.call(base_url=base, timeout=30)
                body = case.body if isinstance(case.body, dict) else {}
                if response.status_code == 504:  # only a deadline the request itself set may be missed
                    assert "deadline_ms" in body and "deadline exceeded" in response.text, response.text
                else:
                    assert response.status_code < 500, (case.body, response.status_code, response.text)
                if response.status_code == 200:
                    case.validate_response(response, checks=[response_schema_conformance])

            check()
            checked += 1
    assert checked >= 6  # recommend (valid and invalid), model, healthz, readyz, metrics
    assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200


# -- the micro-batcher on its own --------------------------------------------------------------------
def test_micro_batcher_batches_caps_cost_drops_expired_and_isolates_failures():
    calls: list[list[int]] = []

    def run(queries: list[int]) -> list[int]:
        calls.append(list(queries))
        if 7 in queries:
            raise ValueError("bad query 7")
        time.sleep(0.05)
        return [q * 10 for q in queries]

    async def scenario() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(run, max_batch=4, max_queue=6, cost=float, max_cost=10)
        await batcher.start()
        try:
            assert await batcher.submit(1, 5) == (10, 1)
            results = await asyncio.gather(*(batcher.submit(q, 5) for q in (1, 2, 3, 4, 5)))
            assert [r for r, _ in results] == [10, 20, 30, 40, 50]
            assert all(sum(batch) <= 10 or len(batch) == 1 for batch in calls)  # the cost cap holds
            assert any(len(batch) > 1 for batch in calls)
            # Queued together (cost 2 + 7 <= 10), so they share a batch; it fails, each query is rerun
            # alone, and only the bad one fails. The good one reports the batch it was queued in.
            del calls[:]
            good, bad = await asyncio.gather(
                batcher.submit(2, 5), batcher.submit(7, 5), return_exceptions=True
            )
            assert calls == [[2, 7], [2], [7]]
            assert good == (20, 2)
            assert isinstance(bad, ValueError) and str(bad) == "bad query 7"
            with pytest.raises(DeadlineExceeded):
                await batcher.submit(1, 0.0)
            flood = await asyncio.gather(*(batcher.submit(1, 5) for _ in range(12)), return_exceptions=True)
            assert any(isinstance(r, Overloaded) for r in flood) and any(
                r == (10, 4) or r == (10, 1) for r in flood
            )
        finally:
            await batcher.stop()

    asyncio.run(scenario())


def test_micro_batcher_survives_python_310_timeouts_and_bad_rounds(monkeypatch):
    """On Python 3.10 ``asyncio.wait_for`` raises ``asyncio.TimeoutError``, which is not the builtin
    ``TimeoutError`` (they are one class from 3.11). Simulate that: a filling wait that times out must
    end the batch, a missed deadline must be DeadlineExceeded, and the worker must outlive both and a
    round that fails outside the model."""

    class LegacyTimeout(Exception):  # what asyncio.TimeoutError is on 3.10
        pass

    real_wait_for = asyncio.wait_for

    async def wait_for(awaitable, timeout):
        try:
            return await real_wait_for(awaitable, timeout)
        except TimeoutError:
            raise LegacyTimeout from None

    monkeypatch.setattr(asyncio, "TimeoutError", LegacyTimeout)
    monkeypatch.setattr(batching.asyncio, "wait_for", wait_for)

    def run(queries: list[int]) -> list[int]:
        time.sleep(0.05 if 9 in queries else 0.0)
        return [q * 10 for q in queries][: 1 if 5 in queries and len(queries) > 1 else None]

    hook_calls = []

    def on_batch(size: int, seconds: float) -> None:
        hook_calls.append(size)
        if len(hook_calls) == 1:
            raise RuntimeError("metrics hook failed")

    async def scenario() -> None:
        batcher: MicroBatcher[int, int] = MicroBatcher(run, max_batch=4, max_wait_ms=5, on_batch=on_batch)
        await batcher.start()
        try:
            assert await batcher.submit(1, 5) == (10, 1)  # the 5 ms fill wait timed out; the hook failed
            assert batcher.running
            with pytest.raises(DeadlineExceeded):
                await batcher.submit(9, 0.01)  # runs 50 ms: the caller's wait times out
            assert batcher.running
            # A result list of the wrong length (a round failing outside the model): both callers get
            # an error at once instead of waiting for their deadline, and the worker serves on.
            short = await asyncio.gather(batcher.submit(5, 5), batcher.submit(6, 5), return_exceptions=True)
            assert all(isinstance(r, RuntimeError) and "2 queries" in str(r) for r in short), short
            assert batcher.running and await batcher.submit(2, 5) == (20, 1)
        finally:
            await batcher.stop()

    asyncio.run(scenario())


# -- the instruction cache's text encoder ------------------------------------------------------------
def test_an_instruction_cache_from_another_text_encoder_is_refused(tiny, tmp_path):  # noqa: F811
    """Hashed and MiniLM vectors are both 384-d: the width cannot tell them apart, re-encoding can."""
    good = tmp_path / "good.sqlite"
    with CRICache(good) as cache:
        cache.put_many([_record(3, "drama"), _record(4, "war")])
    assert InstructionSource("hashed", 384, good).users_with_instruction == 2

    rng = np.random.default_rng(0)
    foreign = rng.standard_normal(384).astype(np.float32)  # 384-d, unit norm, but not hashed("war")
    foreign /= np.linalg.norm(foreign)
    bad = tmp_path / "bad.sqlite"
    with CRICache(bad) as cache:
        cache.put_many([_record(3, "drama"), _record(4, "war", vector=foreign)])
    with pytest.raises(UserInputError, match="not made by the artifact's 'hashed' text encoder .* user 4"):
        InstructionSource("hashed", 384, bad)
    # The service refuses it at start-up in one line, before binding the port.
    line = _one_line_error(serve_main, [f"artifact={tiny.artifact}", f"cri={bad}", "verify=false"])
    assert "regenerate the cache with text_encoder=hashed" in line
