"""HTTP metrics of the API processes: requests by route and status, and their latency.

With `--api-server-count N` every API process counts its own requests; prometheus_client's
multiprocess mode (a shared PROMETHEUS_MULTIPROC_DIR, set by the launcher before the API
processes start) lets whichever process answers a scrape report the sum over all of them.
"""

from __future__ import annotations

import os
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Label values come from these sets only: anyone can send a made-up method or path, and every new
# label value would add lines to /metrics for ever.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER = "other"
LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]


class HttpMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        shared = bool(os.environ.get(MULTIPROC_ENV))
        # In multiprocess mode values go to files in the shared folder; the collector sums them.
        target = None if shared else self.registry
        self.requests = Counter("http_requests", "HTTP requests answered, by method, route and status.",
                                ["method", "handler", "status"], registry=target)
        self.latency = Histogram("http_request_duration_seconds", "Time to answer an HTTP request, streams included.",
                                 ["method", "handler"], buckets=LATENCY_BUCKETS, registry=target)
        if shared:
            MultiProcessCollector(self.registry)

    def observe(self, method: str, handler: str, status: int, seconds: float) -> None:
        self.requests.labels(method, handler, str(status)).inc()
        self.latency.labels(method, handler).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HttpMetricsMiddleware:
    """ASGI middleware timing every HTTP request, labelled by method and route template; unknown
    methods and unmatched paths are `other`, so the label sets stay bounded."""

    def __init__(self, app, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def send_with_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            handler = getattr(scope.get("route"), "path", None) or OTHER
            method = scope["method"] if scope["method"] in KNOWN_METHODS else OTHER
            self.metrics.observe(method, handler, status, time.perf_counter() - started)
