"""Prometheus metrics of the router, in a registry owned by one app (tests build many)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class RouterMetrics:
    """Every metric the router exports; ``render()`` gives the exposition text."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "tqstack_router_requests",
            "Requests answered, by backend, route reason and HTTP status.",
            ["endpoint", "backend", "route", "status"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "tqstack_router_upstream_seconds",
            "Upstream request duration, from sending to the last byte.",
            ["backend"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "tqstack_router_ttfb_seconds",
            "Time from request arrival to the first body byte relayed from the backend.",
            ["backend"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "tqstack_router_overhead_seconds",
            "Router time before the request is sent upstream (parse, route, normalise).",
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self.fallbacks = Counter(
            "tqstack_router_fallbacks",
            "Requests sent to the other backend than the one chosen first.",
            ["from_backend", "to_backend", "cause"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "tqstack_router_upstream_errors",
            "Upstream failures, by backend and kind (connect, timeout, midstream, status...).",
            ["backend", "kind"],
            registry=r,
        )
        self.active_streams = Gauge(
            "tqstack_router_active_streams", "Streams being relayed now.", ["backend"], registry=r
        )
        self.backend_up = Gauge(
            "tqstack_router_backend_up",
            "1 when health says the backend is up, 0 when down or unknown.",
            ["backend"],
            registry=r,
        )
        self.ollama_unloads = Counter(
            "tqstack_router_ollama_unloads",
            "Memory-saver unloads of Ollama models before sidecar work.",
            registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)
