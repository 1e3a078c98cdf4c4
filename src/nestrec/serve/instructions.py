"""Where a request's reasoning instruction ``I_r`` comes from, without an LLM on the request path.

* ``search``: the query text, encoded now with the artifact's text encoder (as in training,
  where a search row's instruction is its query). Encodings are memoised (LRU): head queries
  repeat, and MiniLM costs milliseconds per call on a CPU.
* every other scenario: the user's newest instruction in the slow-thinking cache
  (:class:`~nestrec.oxygen.cri.cache.CRICache`), which a near-line job refreshes. The cache is
  re-read every ``refresh_s`` seconds in the background, so new rows appear without a restart
  and a request never waits on SQLite.
* no cached row (or no cache at all): ``None``, i.e. the model's learned default instruction.

Which text encoder wrote the cache: a cache row records its reasoner (``model``) and prompt version
but not the text encoder that embedded the instruction, and the two encoders nestrec has (hashed
and MiniLM) are both 384-d, so the vector width cannot tell them apart. What a row does record is
the instruction text its vector was made from (the CRI job embeds ``instruction_text(row.text)``),
so :func:`check_instruction_vectors` re-encodes a sample of rows with the artifact's encoder and
refuses the cache unless the stored vectors are reproduced. Export runs it on the cache it copies,
the service on every (re)load.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nestrec.errors import UserInputError
from nestrec.oxygen.cri.cache import CRICache, CRIRecord
from nestrec.oxygen.cri.prompt import instruction_text
from nestrec.oxygen.text import encode_texts

__all__ = ["InstructionSource", "check_instruction_vectors"]

#: Rows re-encoded per (reasoner, prompt version) when a cache is checked, spread over the rows.
CHECK_ROWS = 8
#: A row's vector must be this close (cosine) to the encoder's output for its text. The same
#: encoder reproduces it to ~1e-6 (MiniLM on other hardware or in another batch to ~1e-4); another
#: encoder gives an unrelated vector (|cosine| well under 0.5).
MIN_COSINE = 0.99


def check_instruction_vectors(
    records: Sequence[CRIRecord], encoder: str, where: str, rows: int = CHECK_ROWS
) -> None:
    """Raise :class:`UserInputError` unless ``encoder`` reproduces the sampled rows' vectors.

    The sample is up to ``rows`` rows per (reasoner, prompt version), since each such group is one
    job's output; rows without a vector (fallbacks) are skipped.
    """
    groups: dict[tuple[str, str], list[CRIRecord]] = defaultdict(list)
    for record in records:
        if record.vector is not None:
            groups[(record.model, record.prompt_version)].append(record)
    sample: list[CRIRecord] = []
    for group in groups.values():
        step = max(1, len(group) // rows)
        sample += group[::step][:rows]
    if not sample:
        return
    texts = []
    for record in sample:
        try:
            texts.append(instruction_text(json.loads(record.text or "")))
        except (ValueError, TypeError, KeyError, AttributeError):
            raise UserInputError(
                f"{where}: row (user {record.user}, window {record.window}) has a vector but no parsable "
                f"instruction text, so its text encoder cannot be checked; regenerate the cache"
            ) from None
    expected = encode_texts(texts, encoder).numpy().astype(np.float64)
    for record, want in zip(sample, expected):
        got = record.vector.astype(np.float64)
        norms = float(np.linalg.norm(got) * np.linalg.norm(want))
        cosine = float(got @ want) / norms if norms > 0 else float(np.allclose(got, want))
        if cosine < MIN_COSINE:
            raise UserInputError(
                f"{where}: instruction vectors were not made by the artifact's {encoder!r} text encoder "
                f"(row user {record.user}, window {record.window}, reasoner {record.model!r}: cosine "
                f"{cosine:.2f} with {encoder!r} of its instruction text; rows do not record their encoder, "
                f"so this re-encodes a sample); regenerate the cache with text_encoder={encoder}"
            )


class InstructionSource:
    def __init__(
        self,
        encoder: str,
        dim: int,
        cri_path: str | Path | None = None,
        refresh_s: float = 60.0,
        query_cache_size: int = 4096,
    ):
        self.encoder, self.dim, self.refresh_s = encoder, dim, refresh_s
        self.cri_path = Path(cri_path) if cri_path else None
        self._queries: OrderedDict[str, np.ndarray] = OrderedDict()
        self._query_cache_size = query_cache_size
        self._lock = threading.Lock()
        self._vectors: dict[int, np.ndarray] = {}
        self.loaded_at = 0.0
        if self.cri_path is not None:
            if not self.cri_path.is_file():
                raise UserInputError(f"CRI cache {self.cri_path} does not exist")
            self.reload()

    # -- cached instructions ----------------------------------------------------------------------
    def reload(self) -> int:
        """Re-read the newest usable instruction of every user; returns how many users have one."""
        if self.cri_path is None:
            return 0
        vectors: dict[int, np.ndarray] = {}
        served: list[CRIRecord] = []
        with CRICache(self.cri_path) as cache:
            for user in sorted({r.user for r in cache.records(include_fallback=False)}):
                record = cache.latest(user)
                if record is None or record.vector is None:
                    continue
                if record.vector.shape != (self.dim,):
                    raise UserInputError(
                        f"CRI cache {self.cri_path} holds {record.vector.shape[0]}-d instruction vectors, "
                        f"the artifact's {self.encoder!r} text encoder gives {self.dim}-d"
                    )
                vectors[int(user)] = record.vector.astype(np.float32)
                served.append(record)
        check_instruction_vectors(served, self.encoder, f"CRI cache {self.cri_path}")
        with self._lock:
            self._vectors = vectors
            self.loaded_at = time.time()
        return len(vectors)

    def maybe_reload(self) -> bool:
        """Reload if the last read is older than ``refresh_s`` (called from a background task)."""
        if self.cri_path is None or time.time() - self.loaded_at < self.refresh_s:
            return False
        self.reload()
        return True

    def cached(self, user: int | None) -> np.ndarray | None:
        if user is None:
            return None
        with self._lock:
            return self._vectors.get(int(user))

    @property
    def users_with_instruction(self) -> int:
        with self._lock:
            return len(self._vectors)

    # -- query text ---------------------------------------------------------------------------------
    def known_query(self, text: str) -> np.ndarray | None:
        """The memoised encoding of ``text``, or None (then :meth:`encode_query`, off the event loop)."""
        key = " ".join(text.split()).lower()
        with self._lock:
            hit = self._queries.get(key)
            if hit is not None:
                self._queries.move_to_end(key)
            return hit

    def encode_query(self, text: str) -> np.ndarray:
        hit = self.known_query(text)
        if hit is not None:
            return hit
        key = " ".join(text.split()).lower()
        vector = encode_texts([key], self.encoder)[0].numpy().astype(np.float32)
        with self._lock:
            self._queries[key] = vector
            while len(self._queries) > self._query_cache_size:
                self._queries.popitem(last=False)
        return vector

    def warm_up(self) -> None:
        """Load the text encoder now (MiniLM takes seconds), not on the first search request."""
        self.encode_query("warm up")
