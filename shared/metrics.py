"""Prometheus metrics on `GET /metrics` of every service.

A service process runs one service, so the metrics live in the process's default registry
(beside the client's process metrics: resident memory, CPU, open files) with a `service` label;
where several services share a process (the tests), each one's series stay apart by that label.

Consumers and the HTTP middleware count as they go; what lives elsewhere — the relay's lag in the
database, the published count of a relay in its own process, notify's backlog — is read when
`/metrics` is scraped, by the refresh callbacks each service hands to `instrument`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import asyncpg
from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

Refresh = Callable[[], Awaitable[None]]


class Relay(Protocol):
    """What an `OutboxRelay` and a `RelayProcess` both tell."""

    @property
    def name(self) -> str: ...

    @property
    def published(self) -> int: ...

    async def lag(self) -> int | None: ...


MESSAGES_IN = Counter(
    "dealstream_messages_in",
    "Messages a consumer handled (applied or skipped as already applied)",
    ["service", "consumer", "topic"],
)
MESSAGES_OUT = Counter(
    "dealstream_messages_out",
    "Messages a relay published to Kafka (acknowledged by the broker)",
    ["service", "relay"],
)
PROCESSING = Histogram(
    "dealstream_processing_seconds",
    "Time to handle a consumer batch: a fetch's partitions together, or one partition's alone",
    ["service", "consumer"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
ERRORS = Counter(
    "dealstream_errors",
    "Failures: a consumer batch that will be read again, a 5xx answer, a scrape's failed read",
    ["service", "component"],
)
CONSUMER_LAG = Gauge(
    "dealstream_consumer_lag",
    "Messages on the partition not yet handled by the consumer (high watermark - position)",
    ["service", "consumer", "topic", "partition"],
)
RELAY_LAG = Gauge(
    "dealstream_relay_lag",
    "Events stored in the service's notification log and not yet published (-1: on standby)",
    ["service", "relay"],
)
PROJECTION_LAG = Gauge(
    "dealstream_projection_lag_seconds",
    "How far the read models trail the bus: the last applied event's delay from its publishing,"
    " or its age while later messages wait (shared.runtime.projection_lag)",
    ["service"],
)
REMINDER_BACKLOG = Gauge(
    "dealstream_reminder_backlog",
    "Reminders and escalations due and not yet fired, plus deliveries not yet sent",
    ["service"],
)
HTTP_REQUESTS = Counter(
    "dealstream_http_requests",
    "HTTP requests answered, by route template and status",
    ["service", "method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "dealstream_http_request_seconds",
    "Time to answer an HTTP request, by route template",
    ["service", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


def instrument(api: FastAPI, service: str, refresh: Sequence[Refresh] = ()) -> FastAPI:
    """Count `api`'s requests and serve `GET /metrics`, running `refresh` before each scrape."""
    api.add_middleware(_HttpMetrics, service=service)

    @api.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        for update in refresh:
            try:
                await update()
            except Exception:  # a scrape still answers with what it has
                ERRORS.labels(service, "metrics").inc()
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return api


# A caller can send any token as the method; only these become series of their own.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _HttpMetrics:
    """Plain ASGI middleware (see shared.runtime._Correlation for why not BaseHTTPMiddleware).
    Routes are labelled by their template (`/v1/opportunities/{opportunity_id}`), never by the
    path a caller sent, so the series stay few."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_seen(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_seen)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            if route != "/metrics":
                method = scope["method"] if scope["method"] in METHODS else "other"
                HTTP_REQUESTS.labels(self.service, method, route, str(status)).inc()
                HTTP_SECONDS.labels(self.service, route).observe(time.perf_counter() - started)
                if status >= 500:
                    ERRORS.labels(self.service, "http").inc()


def relay_refresh(service: str, relay: Relay) -> Refresh:
    """The relay's lag and published count, read at scrape time (the relay may be a process of
    its own, sharing only these numbers)."""
    seen = 0

    async def update() -> None:
        nonlocal seen
        lag = await relay.lag()
        RELAY_LAG.labels(service, relay.name).set(-1 if lag is None else lag)
        published = relay.published
        # A restarted relay process counts from zero again: count what it published since.
        MESSAGES_OUT.labels(service, relay.name).inc(published - seen if published >= seen
                                                     else published)  # fmt: skip
        seen = published

    return update


def backlog_refresh(service: str, pool: asyncpg.Pool, query: str) -> Refresh:
    """The reminder backlog, counted by `query` (notify's: one number) at scrape time."""

    async def update() -> None:
        REMINDER_BACKLOG.labels(service).set(float(await pool.fetchval(query) or 0))

    return update
