"""Service metrics in the Prometheus text format, without a client library.

A handful of counters and histograms do not justify a dependency: this renders the exposition
format (version 0.0.4) directly, so any Prometheus-compatible scraper reads ``GET /metrics``.
Everything is updated on the event loop thread (the middleware and the batching worker), so no
locks are needed. Paths are bucketed into the known routes plus ``other`` so a scanner hitting
random URLs cannot grow the label set without bound.
"""

from __future__ import annotations

import bisect
import time
from collections import defaultdict
from collections.abc import Callable

__all__ = ["Histogram", "MetricsMiddleware", "ServiceMetrics"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


class Histogram:
    """Cumulative-bucket histogram, as Prometheus expects."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = tuple(sorted(buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # last = +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str, labels: dict[str, str]) -> list[str]:
        lines, running = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts):
            running += count
            le = "+Inf" if bound == float("inf") else repr(float(bound))
            lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {running}")
        lines.append(f"{name}_sum{_labels(labels)} {self.sum!r}")
        lines.append(f"{name}_count{_labels(labels)} {self.count}")
        return lines


class ServiceMetrics:
    def __init__(self, routes: tuple[str, ...], info: dict[str, str]):
        self.routes = routes
        self.info = info
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.latency: dict[str, Histogram] = defaultdict(lambda: Histogram(LATENCY_BUCKETS))
        self.scenarios: dict[tuple[str, str], int] = defaultdict(int)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.batch_seconds = Histogram(LATENCY_BUCKETS)
        self.gauges: dict[str, Callable[[], float]] = {}
        self.started = time.time()

    def route(self, path: str) -> str:
        return path if path in self.routes else "other"

    def observe_request(self, method: str, path: str, status: int, seconds: float) -> None:
        route = self.route(path)
        self.requests[(method, route, status)] += 1
        self.latency[route].observe(seconds)

    def observe_recommendation(self, scenario: str, outcome: str) -> None:
        self.scenarios[(scenario, outcome)] += 1

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> str:
        out = [
            "# HELP nestrec_info Model served by this process.",
            "# TYPE nestrec_info gauge",
            f"nestrec_info{_labels(self.info)} 1",
            "# HELP nestrec_uptime_seconds Seconds since the service started.",
            "# TYPE nestrec_uptime_seconds gauge",
            f"nestrec_uptime_seconds {time.time() - self.started:.3f}",
            "# HELP nestrec_http_requests_total HTTP requests by method, route and status code.",
            "# TYPE nestrec_http_requests_total counter",
        ]
        for (method, route, status), count in sorted(self.requests.items()):
            out.append(
                f"nestrec_http_requests_total{_labels({'method': method, 'route': route, 'code': str(status)})} {count}"
            )
        out += [
            "# HELP nestrec_http_request_duration_seconds Time from request start to response end, by route.",
            "# TYPE nestrec_http_request_duration_seconds histogram",
        ]
        for route, hist in sorted(self.latency.items()):
            out += hist.render("nestrec_http_request_duration_seconds", {"route": route})
        out += [
            "# HELP nestrec_recommendations_total Recommend calls by scenario and outcome.",
            "# TYPE nestrec_recommendations_total counter",
        ]
        for (scenario, outcome), count in sorted(self.scenarios.items()):
            out.append(
                f"nestrec_recommendations_total{_labels({'scenario': scenario, 'outcome': outcome})} {count}"
            )
        out += [
            "# HELP nestrec_batch_size Requests per model forward pass.",
            "# TYPE nestrec_batch_size histogram",
        ]
        out += self.batch_size.render("nestrec_batch_size", {})
        out += [
            "# HELP nestrec_batch_seconds Model time per forward pass (encode + beam search).",
            "# TYPE nestrec_batch_seconds histogram",
        ]
        out += self.batch_seconds.render("nestrec_batch_seconds", {})
        for name, read in sorted(self.gauges.items()):
            out += [f"# TYPE {name} gauge", f"{name} {float(read())!r}"]
        return "\n".join(out) + "\n"


class MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP response by route and code, and times it."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.observe_request(
                scope["method"], scope["path"], status, time.perf_counter() - started
            )
