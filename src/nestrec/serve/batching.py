"""Micro-batching with deadlines: concurrent requests share one forward pass.

Why: on a CPU (and far more on a GPU) one beam search over 16 requests costs much less than 16
searches over one, because the per-call overhead (Python, kernel launches, the trie walk) is paid
once and the matrix products get wider. The benchmark measures the gain (docs/serving.md).

How: requests go into a bounded queue; one worker takes the first waiting request plus whatever
else is queued (up to ``max_batch``), optionally waiting ``max_wait_ms`` for the batch to fill,
and runs the batch on a dedicated thread so the event loop keeps accepting requests. With
``max_wait_ms = 0`` batching is opportunistic: an idle service answers at once and batches only
form while the model is busy, so low load pays no added latency. ``max_batch = 1`` turns it off.

Deadlines: a request that is past its deadline when its batch forms is dropped unrun; a caller
whose deadline passes while its batch runs gets :class:`DeadlineExceeded` at once (the batch's
work for it is discarded). A full queue answers :class:`Overloaded` instead of queueing work that
would miss its deadline anyway.

Robustness: the worker is one task for the whole service, so nothing a batch does may end it. A
failing batch fails only its own requests (each is retried alone first); anything else that goes
wrong in a round (a metrics hook, a result list of the wrong length) is logged, its requests get
the error, and the worker takes the next batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["DeadlineExceeded", "MicroBatcher", "Overloaded"]

log = logging.getLogger(__name__)

Q = TypeVar("Q")
R = TypeVar("R")


class Overloaded(RuntimeError):
    """The queue is full (HTTP 503)."""


class DeadlineExceeded(TimeoutError):
    """The request's deadline passed before its result was ready (HTTP 504)."""


@dataclass(eq=False)
class _Pending(Generic[Q, R]):
    query: Q
    deadline: float  # time.monotonic()
    future: asyncio.Future = field(repr=False)


class MicroBatcher(Generic[Q, R]):
    """``run(queries) -> results`` (same order, a result may be an Exception) behind an async queue."""

    def __init__(
        self,
        run: Callable[[list[Q]], Sequence[R | BaseException]],
        max_batch: int = 32,
        max_wait_ms: float = 0.0,
        max_queue: int = 256,
        cost: Callable[[Q], float] | None = None,
        max_cost: float = float("inf"),
        on_batch: Callable[[int, float], None] | None = None,
    ):
        """``cost(query)`` / ``max_cost`` cap a batch by work, not only by count (a batch always
        takes at least one query): on a CPU, four requests at beam 256 share a pass well, sixteen
        do worse than four (docs/serving.md has the measurements)."""
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError(
                f"need max_batch >= 1, max_queue >= 1, max_wait_ms >= 0; got {max_batch}, {max_queue}, {max_wait_ms}"
            )
        self._run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000
        self.max_queue = max_queue
        self._cost, self.max_cost = cost or (lambda query: 1.0), max_cost
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Pending[Q, R]] | None = None
        self._carry: _Pending[Q, R] | None = None  # taken from the queue but over the last batch's budget
        self._worker: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nestrec-model")

    @property
    def depth(self) -> int:
        return (self._queue.qsize() if self._queue is not None else 0) + (self._carry is not None)

    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    async def start(self) -> None:
        self._queue = asyncio.Queue(self.max_queue)
        self._worker = asyncio.create_task(self._loop(), name="nestrec-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._pool.shutdown(wait=True)

    async def call(self, fn: Callable[[], R]) -> R:
        """Run ``fn`` on the model thread (warm-up, maintenance): it never overlaps a batch."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def submit(self, query: Q, timeout_s: float) -> tuple[R, int]:
        """The result for ``query`` and the size of the batch that computed it."""
        if self._queue is None or not self.running:
            raise Overloaded("the batching worker is not running")
        deadline = time.monotonic() + timeout_s
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(query, deadline, future))
        except asyncio.QueueFull:
            raise Overloaded(f"{self.max_queue} requests are already queued") from None
        try:
            return await asyncio.wait_for(asyncio.shield(future), max(0.0, deadline - time.monotonic()))
        except (TimeoutError, asyncio.TimeoutError):  # two classes on Python 3.10, one from 3.11
            future.cancel()
            raise DeadlineExceeded(f"no result within the {timeout_s * 1000:.0f} ms deadline") from None

    async def _collect(self, batch: list[_Pending[Q, R]]) -> None:
        """Fill ``batch`` (the caller's list, so a failure here still knows whom to answer)."""
        assert self._queue is not None
        first, self._carry = self._carry or await self._queue.get(), None
        batch.append(first)
        cost = self._cost(first.query)
        fill_until = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                pending = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = fill_until - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    pending = await asyncio.wait_for(self._queue.get(), remaining)
                except (TimeoutError, asyncio.TimeoutError):  # two classes on Python 3.10
                    break
            batch.append(pending)  # answered by the caller's error path even if the cost check fails
            cost += self._cost(pending.query)
            if cost > self.max_cost:
                batch.pop()
                self._carry = pending  # first in line for the next batch
                break

    async def _loop(self) -> None:
        while True:
            batch: list[_Pending[Q, R]] = []
            try:
                await self._collect(batch)
                await self._serve(batch)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # never let one round end the worker
                log.exception("micro-batcher: a batch of %d request(s) failed; serving on", len(batch))
                failure = RuntimeError(f"the batch failed: {type(err).__name__}: {err}")
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(failure)

    async def _serve(self, batch: list[_Pending[Q, R]]) -> None:
        now = time.monotonic()
        live = []
        for p in batch:
            if p.future.done():  # its caller already gave up
                continue
            if p.deadline <= now:
                p.future.set_exception(DeadlineExceeded("the deadline passed while the request was queued"))
                continue
            live.append(p)
        if not live:
            return
        started = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._run_isolated, [p.query for p in live]
            )
        except Exception as err:  # the executor itself failed: every caller learns why
            results = [err] * len(live)
        if len(results) != len(live):
            raise RuntimeError(f"the model returned {len(results)} results for {len(live)} queries")
        for p, result in zip(live, results):
            if p.future.done():
                continue
            if isinstance(result, BaseException):
                p.future.set_exception(result)
            else:
                p.future.set_result((result, len(live)))
        if self._on_batch is not None:
            try:
                self._on_batch(len(live), time.perf_counter() - started)
            except Exception:  # a metrics hook must not fail requests that already have results
                log.exception("micro-batcher: the on_batch hook failed")

    def _run_isolated(self, queries: list[Q]) -> Sequence[R | BaseException]:
        """Run the batch; if it fails, run each query alone so one bad query fails only itself."""
        try:
            return self._run(queries)
        except Exception:
            if len(queries) == 1:
                raise
        out: list[R | BaseException] = []
        for query in queries:
            try:
                out.append(self._run([query])[0])
            except Exception as err:
                out.append(err)
        return out
