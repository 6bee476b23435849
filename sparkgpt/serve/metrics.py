"""The Prometheus series the server exports at /metrics, and the middleware that counts and times requests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sparkgpt.serve.engine import Engine


class Metrics:
    """The Prometheus series the server exports at /metrics (a registry of its own, one per app)."""

    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sparkgpt_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram(
            "sparkgpt_request_latency_seconds", "Time from request to the last byte of the response, by route",
            ["route"], registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160))
        self.time_to_first_token = Histogram(
            "sparkgpt_time_to_first_token_seconds", "Time from request to the first generated text",
            registry=r, buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40))
        self.prompt_tokens = Counter("sparkgpt_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("sparkgpt_generation_tokens", "Tokens generated for finished requests",
                                         registry=r)
        self.aborted = Counter("sparkgpt_requests_aborted", "Requests aborted because the client went away",
                               registry=r)
        self.rejected = Counter("sparkgpt_requests_rejected", "Requests refused because the queue was full",
                                registry=r)
        queue_depth = Gauge("sparkgpt_queue_depth", "Requests waiting for a slot", registry=r)
        queue_depth.set_function(lambda: _engine_value(engine, "queue_depth"))
        active = Gauge("sparkgpt_active_sequences", "Sequences holding a KV-cache slot", registry=r)
        active.set_function(lambda: _engine_value(engine, "active_sequences"))
        slots = Gauge("sparkgpt_slots", "KV-cache slots (sequences decoded together at most)", registry=r)
        slots.set_function(lambda: _engine_value(engine, "max_slots"))
        reused = Gauge("sparkgpt_prompt_tokens_reused", "Prompt tokens whose keys/values were copied from a "
                       "cached prefix instead of computed", registry=r)
        reused.set_function(lambda: _engine_value(engine, "reused_prompt_tokens"))
        kept = Gauge("sparkgpt_prefix_cache_bytes", "Memory held by the keys/values kept for later prompts",
                     registry=r)
        kept.set_function(lambda: _engine_value(engine, "prefix_cache_bytes"))
        steps = Gauge("sparkgpt_decode_steps", "Batched decode steps run since start", registry=r)
        steps.set_function(lambda: _engine_value(engine, "steps"))


def _engine_value(engine: Callable[[], Engine | None], name: str) -> float:
    """An engine gauge's value: 0 while the engine is loading."""
    running = engine()
    return 0 if running is None else getattr(running, name)


ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings"}


class MetricsMiddleware:
    """Counts every request by route and status and times it to its last byte (pure ASGI: streams pass as is)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in ROUTES else "/static" if path.startswith("/static/") else "other"
        status = 500
        start = time.perf_counter()

        async def send_with_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
