"""Service metrics for ``GET /metrics``, kept by ``prometheus_client``.

Each service owns its own :class:`~prometheus_client.CollectorRegistry` (not the process-global
one), so several services in one process (tests, a multi-model host) never share or collide on
series. Everything is updated on the event loop thread (the middleware and the batching worker).
Paths are bucketed into the known routes plus ``other`` so a scanner hitting random URLs cannot
grow the label set without bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

__all__ = ["CONTENT_TYPE", "MetricsMiddleware", "ServiceMetrics"]

# generate_latest() writes the classic text format (0.0.4); say so rather than the library's
# newest content type, which names a format this renderer does not produce.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServiceMetrics:
    """The service's series: requests by route and code, latency, recommend outcomes by scenario,
    micro-batch sizes and model time, plus gauges read at scrape time (:meth:`gauge`)."""

    def __init__(self, routes: tuple[str, ...], info: dict[str, str]):
        self.routes = routes
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        Info("nestrec", "Model served by this process.", registry=r).info(info)
        started = time.time()
        Gauge("nestrec_uptime_seconds", "Seconds since the service started.", registry=r).set_function(
            lambda: time.time() - started
        )
        self.requests = Counter(
            "nestrec_http_requests",
            "HTTP requests by method, route and status code.",
            ("method", "route", "code"),
            registry=r,
        )
        self.latency = Histogram(
            "nestrec_http_request_duration_seconds",
            "Time from request start to response end, by route.",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.recommendations = Counter(
            "nestrec_recommendations",
            "Recommend calls by scenario and outcome.",
            ("scenario", "outcome"),
            registry=r,
        )
        self.batch_size = Histogram(
            "nestrec_batch_size", "Requests per model forward pass.", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "nestrec_batch_seconds",
            "Model time per forward pass (encode + beam search).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge whose value is ``read()`` at scrape time."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def route(self, path: str) -> str:
        return path if path in self.routes else "other"

    def observe_request(self, method: str, path: str, status: int, seconds: float) -> None:
        route = self.route(path)
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_recommendation(self, scenario: str, outcome: str) -> None:
        self.recommendations.labels(scenario, outcome).inc()

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.batch_seconds.observe(seconds)

    def render(self) -> str:
        return generate_latest(self.registry).decode()


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
