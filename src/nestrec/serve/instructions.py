"""Where a request's reasoning instruction ``I_r`` comes from, without an LLM on the request path.

* ``search``: the query text, encoded now with the artifact's text encoder (as in training,
  where a search row's instruction is its query). Encodings are memoised (LRU): head queries
  repeat, and MiniLM costs milliseconds per call on a CPU.
* every other scenario: the user's newest instruction in the slow-thinking cache
  (:class:`~nestrec.oxygen.cri.cache.CRICache`), which a near-line job refreshes. The cache is
  re-read every ``refresh_s`` seconds in the background, so new rows appear without a restart
  and a request never waits on SQLite.
* no cached row (or no cache at all): ``None``, i.e. the model's learned default instruction.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from nestrec.errors import UserInputError
from nestrec.oxygen.cri.cache import CRICache
from nestrec.oxygen.text import encode_texts

__all__ = ["InstructionSource"]


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
