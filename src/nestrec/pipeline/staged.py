"""A lane without a thread: staged work that its owner advances between its own stages.

Key routing is host work around two collectives (counts, then keys). On a GPU host a router
*thread* runs it while the main thread feeds the device. On CPU training every core already
computes, so a thread only takes turns with compute on the same cores, and what it really hides
— the wait for the peers' collectives — needs no thread at all: start the collective
asynchronously, do other work, wait later. That is how TorchRec's sparse-dist pipeline overlaps
its input dist on one thread.

A job is a generator that yields right after starting each collective (see
:func:`nestrec.sharding.dataplane.route_stages`). ``submit`` runs its first stage at once;
``advance()``, called by the owner at fixed points of its schedule, runs the next stage of every
job in flight, oldest first; ``wait()`` finishes a job (and every older one first). Every rank
runs the same schedule, so every rank issues the jobs' collectives in the same order — the
condition for collectives on one process group to pair up.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator
from typing import Any

__all__ = ["StagedHandle", "StagedLane"]


class StagedHandle:
    """One job of a :class:`StagedLane`; ``wait()`` returns its result (or raises its error)."""

    def __init__(self, lane: StagedLane, stages: Generator[None, None, Any]):
        self._lane, self._stages = lane, stages
        self.done = False
        self._value: Any = None
        self._error: BaseException | None = None

    def advance(self) -> None:
        """Run the job's next stage (nothing once it is done)."""
        if self.done:
            return
        try:
            next(self._stages)
        except StopIteration as finished:
            self.done, self._value = True, finished.value
        except BaseException as err:  # noqa: BLE001 - handed to whoever waits, like a future
            self.done, self._error = True, err

    def wait(self) -> Any:
        self._lane.finish(self)
        if self._error is not None:
            raise self._error
        return self._value


class StagedLane:
    """Jobs advanced cooperatively on the caller's thread, in submission order."""

    def __init__(self, name: str):
        self.name = name
        self._jobs: deque[StagedHandle] = deque()

    def submit(self, stages: Generator[None, None, Any]) -> StagedHandle:
        """Queue a job and run its first stage now."""
        handle = StagedHandle(self, stages)
        self._jobs.append(handle)
        handle.advance()
        return handle

    def advance(self) -> None:
        """One stage of every job in flight, oldest first."""
        for job in list(self._jobs):
            job.advance()
        self._drop_done()

    def finish(self, handle: StagedHandle) -> None:
        """Run ``handle`` and every job submitted before it to their ends."""
        while not handle.done:
            self._jobs[0].advance()
            self._drop_done()
        self._drop_done()

    def shutdown(self) -> None:
        while self._jobs:
            self.finish(self._jobs[-1])

    def _drop_done(self) -> None:
        while self._jobs and self._jobs[0].done:
            self._jobs.popleft()


def timed_stages(stages: Generator[None, None, Any], span: Callable[[], Any]) -> Generator[None, None, Any]:
    """``stages`` with each stage's host work inside ``span()`` (a timeline span context)."""
    while True:
        with span():
            try:
                next(stages)
            except StopIteration as finished:
                return finished.value
        yield
