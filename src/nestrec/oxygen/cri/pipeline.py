"""The near-line CRI job: (user, window) → context → prompt → reasoner → validated JSON → vector → cache.

It is a plain job, not a training step (no LLM ever runs on the request or training path):

1. :func:`plan_windows` picks which (user, window) pairs need an instruction: for a capped set of
   users, the windows in which their evaluation targets and last training targets fall. A window
   is ``window_seconds`` long (default 5 minutes, the paper's refresh window).
2. :func:`build_context` gathers what the reasoner may see: behaviour strictly before the window
   start, the profile, the time. Nothing at or after ``as_of`` — the leakage contract of the cache.
3. :class:`CRIJob` sends prompts in batches, validates each answer against the JSON schema, encodes
   the instruction text with the same text encoder as item titles and commits each batch to the
   SQLite cache. Backend errors and invalid answers are retried a bounded number of times per
   prompt, counted, and end as a ``fallback`` row (the model then uses its learned default
   instruction): one bad answer never stops the job.
4. Resume: keys already in the cache for this backend + prompt version are skipped, so a killed
   job continues where its last committed batch stopped; rows that fail their checksum are
   regenerated.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from nestrec.data.dataset import Dataset
from nestrec.data.splits import Split
from nestrec.oxygen.cri.cache import CRICache, CRIRecord
from nestrec.oxygen.cri.prompt import (
    PROMPT_VERSION,
    InvalidInstruction,
    UserContext,
    build_prompt,
    instruction_text,
    parse_instruction,
)

__all__ = ["CRIJob", "CRIStats", "ContextBuilder", "build_context", "plan_windows"]

log = logging.getLogger(__name__)

Encoder = Callable[[list[str]], torch.Tensor]


def plan_windows(
    split: Split,
    max_users: int | None,
    window_seconds: int = 300,
    train_windows: int = 1,
    seed: int = 0,
) -> list[tuple[int, int]]:
    """(user, window) pairs to reason about, in a stable order.

    Users: ``max_users`` drawn with ``seed`` among those with evaluation rows (all when None).
    Windows per user: those of the test and validation targets and of the last ``train_windows``
    training targets, so training sees instructions too (joined as of each sample's time).
    """
    users = split.test.users
    if max_users is not None and max_users < len(users):
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    chosen = set(users.tolist())
    times: dict[int, set[int]] = {u: set() for u in chosen}
    for samples in (split.test, split.valid):
        for user, ts in zip(samples.users.tolist(), samples.timestamps.tolist()):
            if user in chosen:
                times[user].add(int(ts) // window_seconds)
    if train_windows:
        for user, stamps in zip(split.train_users.tolist(), split.train_timestamps):
            if user in chosen and len(stamps):
                for ts in stamps[-train_windows:].tolist():
                    times[user].add(int(ts) // window_seconds)
    return [(u, w) for u in sorted(chosen) for w in sorted(times[u])]


class ContextBuilder:
    """Indexes a dataset once (interactions per user, items and users by id) for many contexts.

    The job builds one context per (user, window); re-grouping the interactions or re-indexing the
    catalogue for each of them would dominate a rules-backend run.
    """

    def __init__(self, data: Dataset):
        self.data = data
        self.rows_by_user = {int(u): frame for u, frame in data.interactions.groupby("user", sort=False)}
        self.items = data.items.set_index("item")
        self.users = data.users.set_index("user")
        self.empty = data.interactions.iloc[0:0]

    def build(self, user: int, window: int, window_seconds: int = 300, recent: int = 10) -> UserContext:
        """The reasoner's view of ``user`` at the start of ``window``: only strictly earlier behaviour."""
        as_of = float(window * window_seconds)
        inter = self.rows_by_user.get(int(user), self.empty)
        before = inter[inter["timestamp"].to_numpy() < as_of].tail(recent)
        items = self.items.loc[before["item"].to_numpy()]
        rows = [
            {
                "title": str(title),
                "genres": str(genres),
                "year": None if year != year else int(year),  # NaN-safe
                "rating": None if rating != rating else float(rating),
            }
            for title, genres, year, rating in zip(
                items["title"], items["genres"], items["year"], before.get("rating", [None] * len(before))
            )
        ]
        profile = {}
        if int(user) in self.users.index:
            row = self.users.loc[int(user)]
            profile = {k: str(row[k]) for k in ("gender", "age", "occupation") if k in row.index}
        return UserContext(user, window, as_of, profile, rows, list(self.data.genre_vocab))


def build_context(
    data: Dataset, user: int, window: int, window_seconds: int = 300, recent: int = 10
) -> UserContext:
    """One context without keeping an index (see :class:`ContextBuilder` for many)."""
    return ContextBuilder(data).build(user, window, window_seconds, recent)


@dataclass
class CRIStats:
    planned: int = 0
    cached: int = 0  # already in the cache (resume)
    generated: int = 0  # ok rows written this run
    fallbacks: int = 0  # rows that ended as the default instruction
    backend_errors: int = 0
    invalid_outputs: int = 0
    retries: int = 0
    corrupt_regenerated: int = 0
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class CRIJob:
    """Run a reasoner over planned windows into a cache. ``backend.generate`` takes (system, user) pairs."""

    def __init__(
        self,
        backend,
        cache: CRICache,
        encoder: Encoder,
        data: Dataset,
        window_seconds: int = 300,
        recent: int = 10,
        batch_size: int = 8,
        max_retries: int = 2,
        retry_backoff_s: float = 0.0,
        progress: bool = True,
    ):
        if max_retries < 0 or batch_size < 1:
            raise ValueError("max_retries must be >= 0 and batch_size >= 1")
        self.backend, self.cache, self.encoder, self.data = backend, cache, encoder, data
        self.contexts = ContextBuilder(data)
        self.window_seconds, self.recent = window_seconds, recent
        self.batch_size, self.max_retries, self.retry_backoff_s = batch_size, max_retries, retry_backoff_s
        self.progress = progress

    def run(self, keys: list[tuple[int, int]]) -> CRIStats:
        started = time.time()
        stats = CRIStats(planned=len(keys))
        corrupt = set(self.cache.verify())
        done = self.cache.done_keys()
        todo = [k for k in keys if k not in done]
        stats.cached = len(keys) - len(todo)
        stats.corrupt_regenerated = sum(k in corrupt for k in todo)
        bar = tqdm(total=len(todo), desc="CRI", unit="window", disable=not self.progress)
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            contexts = [self.contexts.build(u, w, self.window_seconds, self.recent) for u, w in batch]
            answers = self._answer([build_prompt(c) for c in contexts], stats)
            self.cache.put_many(self._records(contexts, answers, stats))
            bar.update(len(batch))
        bar.close()
        stats.seconds = round(time.time() - started, 2)
        return stats

    # -- one batch ----------------------------------------------------------------------------------
    def _answer(self, prompts: list[tuple[str, str]], stats: CRIStats) -> list[tuple[dict | None, int]]:
        """Per prompt: (validated instruction or None, attempts used). One batched call first."""
        from nestrec.oxygen.cri.backends import BackendError

        try:
            first = self.backend.generate(prompts)
        except BackendError as err:
            stats.backend_errors += 1
            log.warning("CRI backend error on a batch of %d: %s", len(prompts), err)
            first = [None] * len(prompts)
        out = []
        for prompt, text in zip(prompts, first):
            attempts, value = 1, None
            while True:
                if text is not None:
                    try:
                        value = parse_instruction(text)
                        if len(stats.examples) < 3:
                            stats.examples.append(text.strip()[:300])
                        break
                    except InvalidInstruction as err:
                        stats.invalid_outputs += 1
                        log.debug("invalid CRI output (%s): %r", err, text[:200])
                if attempts > self.max_retries:
                    break
                attempts += 1
                stats.retries += 1
                if self.retry_backoff_s:
                    time.sleep(self.retry_backoff_s * attempts)
                try:
                    text = self.backend.generate([prompt])[0]
                except BackendError as err:
                    stats.backend_errors += 1
                    log.warning("CRI backend error (attempt %d): %s", attempts, err)
                    text = None
            out.append((value, attempts))
        return out

    def _records(
        self, contexts: list[UserContext], answers: list[tuple[dict | None, int]], stats: CRIStats
    ) -> list[CRIRecord]:
        texts = [instruction_text(value) for value, _ in answers if value is not None]
        vectors = iter(self.encoder(texts).numpy().astype(np.float32)) if texts else iter(())
        records = []
        for ctx, (value, attempts) in zip(contexts, answers):
            if value is None:
                stats.fallbacks += 1
                records.append(self._record(ctx, "fallback", None, None, attempts))
            else:
                stats.generated += 1
                records.append(self._record(ctx, "ok", _dumps(value), next(vectors), attempts))
        return records

    def _record(self, ctx: UserContext, status: str, text, vector, attempts: int) -> CRIRecord:
        return CRIRecord(
            ctx.user,
            ctx.window,
            ctx.as_of,
            self.backend.name,
            PROMPT_VERSION,
            status,
            text,
            vector,
            attempts,
        )


def _dumps(value: dict) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)
