"""Where step time goes: spans recorded by the pipeline's threads, summaries, trace and plot.

Every stage the engine runs is a span ``(name, lane, step, start, end)``; a lane is the thread
(stream) it ran on — ``main`` (compute), ``router`` (key routing), ``retrieval`` (host gather and
write-back), ``comm`` (micro-batch All2All). Spans whose name starts with ``wait:`` are the main
thread blocked on another lane: that is the *exposed* part of data movement, the quantity the
pipelines exist to shrink.

The trace exports as Chrome-trace JSON (open in ``chrome://tracing`` or Perfetto) and as a PNG
timeline, so the overlap is visible without any tool.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Span", "Timeline", "EXPOSED_COMM", "EXPOSED_LOOKUP"]

# Main-thread spans that count as exposed embedding communication / exposed lookup.
EXPOSED_COMM = ("a2a_fwd", "a2a_bwd", "wait:a2a_fwd", "wait:a2a_bwd")
EXPOSED_LOOKUP = ("route", "retrieve", "wait:route", "wait:retrieve")
LANES = ("main", "router", "retrieval", "comm")


@dataclass(frozen=True)
class Span:
    name: str
    lane: str
    step: int
    start: float
    end: float

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1e3


class Timeline:
    """Thread-safe span recorder, indexed by step; keeps the spans of the most recent ``capacity`` steps.

    The per-step index keeps ``stage_ms`` / ``exposed_ms`` (called every training step) from
    scanning every recorded span.
    """

    def __init__(self, capacity: int = 500):
        self._steps: OrderedDict[int, list[Span]] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()
        self.origin = time.perf_counter()

    @contextmanager
    def span(self, name: str, lane: str, step: int) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            with self._lock:
                if step not in self._steps:
                    self._steps[step] = []
                    while len(self._steps) > self._capacity:
                        self._steps.popitem(last=False)
                self._steps[step].append(Span(name, lane, step, start, end))

    def spans(self, steps: set[int] | None = None) -> list[Span]:
        with self._lock:
            keys = list(self._steps) if steps is None else [k for k in steps if k in self._steps]
            return [span for k in keys for span in self._steps[k]]

    def clear(self) -> None:
        with self._lock:
            self._steps.clear()

    def stage_ms(self, step: int) -> dict[str, float]:
        """Total milliseconds per ``lane/name`` spent on ``step``'s batch."""
        totals: dict[str, float] = defaultdict(float)
        for span in self.spans({step}):
            totals[f"{span.lane}/{span.name}"] += span.ms
        return dict(totals)

    def exposed_ms(self, step: int) -> tuple[float, float]:
        """(exposed communication, exposed lookup) on the main thread for ``step``."""
        comm = lookup = 0.0
        for span in self.spans({step}):
            if span.lane != "main":
                continue
            if span.name in EXPOSED_COMM:
                comm += span.ms
            elif span.name in EXPOSED_LOOKUP:
                lookup += span.ms
        return comm, lookup

    # -- exports ------------------------------------------------------------------------------------
    def write_chrome_trace(self, path: str | Path, steps: set[int] | None = None) -> Path:
        """Chrome-trace JSON (``traceEvents`` of complete events, one thread row per lane)."""
        events = [
            {
                "name": s.name,
                "cat": s.lane,
                "ph": "X",
                "ts": (s.start - self.origin) * 1e6,
                "dur": (s.end - s.start) * 1e6,
                "pid": 0,
                "tid": LANES.index(s.lane) if s.lane in LANES else len(LANES),
                "args": {"step": s.step},
            }
            for s in self.spans(steps)
        ]
        meta = [
            {"name": "thread_name", "ph": "M", "pid": 0, "tid": i, "args": {"name": lane}}
            for i, lane in enumerate(LANES)
        ]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"traceEvents": meta + events}))
        return path

    def plot(self, path: str | Path, steps: set[int] | None = None, title: str = "") -> Path:
        """PNG timeline: one row per lane, one colour per stage, batch index written on long spans."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        spans = self.spans(steps)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = sorted({s.name for s in spans})
        cmap = plt.get_cmap("tab20")
        colour = {n: cmap(i % 20) for i, n in enumerate(names)}
        # Window on the main thread's work: read-ahead done long before (e.g. while other runs
        # of a benchmark were interleaved) is clipped to the window's left edge.
        main = [s.start for s in spans if s.lane == "main"]
        t0 = min(main or [s.start for s in spans] or [0.0])
        fig, ax = plt.subplots(figsize=(12, 3.2))
        for s in spans:
            if s.end < t0:
                continue
            row = LANES.index(s.lane) if s.lane in LANES else len(LANES)
            start = max(s.start, t0)
            ax.barh(
                row,
                (s.end - start) * 1e3,
                left=(start - t0) * 1e3,
                color=colour[s.name],
                edgecolor="black",
                lw=0.3,
            )
        ax.set_yticks(range(len(LANES)), LANES)
        ax.invert_yaxis()
        ax.set_xlabel("ms")
        handles = [plt.Rectangle((0, 0), 1, 1, color=colour[n]) for n in names]
        ax.legend(
            handles,
            names,
            fontsize=7,
            ncol=min(6, max(1, len(names))),
            loc="upper center",
            bbox_to_anchor=(0.5, -0.25),
        )
        ax.set_title(title or "NestPipe timeline")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
