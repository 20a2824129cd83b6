"""Running a service process: its HTTP API under uvicorn and its background loops (relay,
consumers, schedulers) side by side on one event loop, stopped together on SIGINT/SIGTERM; and
the `/healthz` and `/readyz` routes every service answers the same way."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import uvicorn
from aiokafka.admin import AIOKafkaAdminClient
from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.bus.consumer import BatchConsumer
from shared.bus.kafka import cluster_id, make_admin
from shared.bus.loops import being_cancelled, sleep_or_stop
from shared.bus.relay import OutboxRelay
from shared.bus.relay_process import RelayProcess
from shared.clock import asked_time
from shared.contracts.common import NUL_MESSAGE
from shared.gctune import tune_gc
from shared.logs import CORRELATION
from shared.metrics import PROJECTION_LAG, Refresh, instrument, relay_refresh
from shared.settings import Settings
from shared.store.db import create_pool
from shared.store.migrations import Migration, migrate
from shared.tracing import span

log = logging.getLogger(__name__)
T = TypeVar("T")

Loop = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


class Readiness:
    """What `/readyz` checks: the database, the broker, and that each loop runs and keeps up."""

    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        consumers: Sequence[BatchConsumer] = (),
        relay: OutboxRelay | RelayProcess | None = None,
        max_relay_lag: int = 10_000,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.consumers = consumers
        self.relay = relay
        self.max_relay_lag = max_relay_lag
        self._admin: AIOKafkaAdminClient | None = None  # one client for all probes

    async def check(self) -> dict[str, object]:
        checks: dict[str, object] = {}
        try:
            await asyncio.wait_for(self.pool.fetchval("SELECT 1"), 2)
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unreachable: {type(exc).__name__}"
        try:
            if self._admin is None:
                admin = make_admin(self.settings)
                await asyncio.wait_for(admin.start(), 3)
                self._admin = admin
            checks["broker"] = {"cluster_id": await asyncio.wait_for(cluster_id(self._admin), 3)}
        except Exception as exc:
            checks["broker"] = f"unreachable: {type(exc).__name__}"
            if self._admin is not None:
                with contextlib.suppress(Exception):
                    await self._admin.close()
                self._admin = None
        for consumer in self.consumers:
            checks[f"consumer:{consumer.name}"] = "ok" if consumer.running else "not running"
        if self.relay is not None and checks["database"] == "ok":
            lag = await self.relay.lag()
            checks["relay_lag"] = "standby" if lag is None else lag
            if lag is not None and lag > self.max_relay_lag:
                checks["relay"] = f"behind by {lag}"
        return checks

    @staticmethod
    def ready(checks: dict[str, object]) -> bool:
        return all(
            not (isinstance(v, str) and v != "ok") for k, v in checks.items() if k != "relay_lag"
        )


def correlate(api: FastAPI) -> FastAPI:
    """Every request gets a correlation id — the caller's `x-request-id`, or a new one — that
    the events it causes carry, and that the answer echoes."""
    api.add_middleware(_Correlation)
    return api


class _Correlation:
    """Plain ASGI middleware: the request runs in the caller's task, so the context variable
    reaches the endpoint without the task group and streams of `BaseHTTPMiddleware` (a third
    of the event loop's time per command, measured under load)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if _has_nul(scope):
            await JSONResponse(NUL_IN_URL, status_code=422)(scope, receive, send)
            return
        correlation_id = Headers(scope=scope).get("x-request-id") or str(uuid.uuid4())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                MutableHeaders(scope=message)["x-request-id"] = correlation_id
            await send(message)

        token = CORRELATION.set(correlation_id)
        try:
            with span(f"HTTP {scope['method']}", **{"http.target": scope["path"]}):
                await self.app(scope, receive, send_with_id)
        finally:
            CORRELATION.reset(token)


def asked(name: str, at: datetime | None) -> datetime | None:
    """A time a request names (`as_of`, `from`, `to`) in UTC, or a 422 naming it: it needs a
    zone and must lie in 1970-2199 (shared.clock.asked_time)."""
    if at is None:
        return None
    utc = asked_time(at)
    if utc is None:
        raise HTTPException(422, f"{name} needs a time zone (e.g. 2026-12-01T00:00:00Z) and"
                            " must lie between 1970 and 2199")  # fmt: skip
    return utc


NUL_IN_URL = {"detail": [{"type": "invalid_character", "loc": ["query"], "msg": NUL_MESSAGE}]}


def _has_nul(scope: Scope) -> bool:
    """A NUL in the path or the query: no text column takes it, so it is refused up front, for
    every route (a filter's value goes into SQL)."""
    return any(
        b"%00" in part or b"\x00" in part
        for part in (scope.get("raw_path", b""), scope.get("query_string", b""))
    )


def correlation_id() -> str:
    """The correlation id of the request being handled ("" outside a request)."""
    return CORRELATION.get()


def health_router(readiness: Callable[[], Readiness | None]) -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @router.get("/readyz")
    async def readyz() -> JSONResponse:
        probe = readiness()
        if probe is None:
            return JSONResponse({"status": "starting"}, status_code=503)
        checks = await probe.check()
        ok = Readiness.ready(checks)
        return JSONResponse(
            {"status": "ready" if ok else "not ready", "checks": checks},
            status_code=200 if ok else 503,
        )

    return router


def observed(
    api: FastAPI, service: str, readiness: Callable[[], Readiness | None], *refresh: Refresh
) -> FastAPI:
    """`GET /metrics` for a service (shared.metrics): its requests and consumers as counted,
    its relay's lag and published count read at each scrape, with the service's own `refresh`."""
    relays: dict[int, Refresh] = {}  # one per relay: each keeps the count it last saw

    async def relay() -> None:
        probe = readiness()
        if probe is not None and probe.relay is not None:
            update = relays.setdefault(id(probe.relay), relay_refresh(service, probe.relay))
            await update()

    return instrument(api, service, [relay, *refresh])


def projection_refresh(service: str, readiness: Callable[[], Readiness | None]) -> Refresh:
    """The projection lag of a service whose consumers feed read models, read at scrape time."""

    async def update() -> None:
        probe = readiness()
        lags = [projection_lag(c) for c in probe.consumers] if probe is not None else []
        if known := [lag for lag in lags if lag is not None]:
            PROJECTION_LAG.labels(service).set(max(known))

    return update


def projection_lag(consumer: BatchConsumer, now: float | None = None) -> float | None:
    """How far the read models trail the bus, in seconds: the last applied event's delay while
    the consumer keeps up; while messages wait, the age of that event, which grows until the
    consumer moves again (a stuck projection shows, not its last good delay)."""
    if consumer.delay is None or consumer.applied_published is None:
        return None
    if consumer.behind == 0:
        return consumer.delay
    return max(consumer.delay, (now or time.time()) - consumer.applied_published)


LOOP_ENDED = 70  # the exit status of a service one of whose loops ended while it ran


class LoopEnded(RuntimeError):
    """A service's loop ended while the service ran (see `serve`); `run_service` exits with
    LOOP_ENDED."""


async def serve(app: FastAPI, port: int, loops: Sequence[Loop], host: str = "127.0.0.1") -> None:
    """Serve `app` and run `loops` until a signal stops uvicorn; then stop the loops.

    Every loop runs until stopped. One that ends before (an exception it did not catch, a
    CancelledError a library raised of its own) would leave the service answering HTTP while
    it no longer consumes, relays or schedules: the service stops instead (LoopEnded) and exits
    with LOOP_ENDED, so whatever runs it (`dealstream run`, a service manager) starts it
    afresh."""
    stop = asyncio.Event()
    tasks = [asyncio.create_task(loop(stop), name=getattr(loop, "__qualname__", "loop"))
             for loop in loops]  # fmt: skip
    config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False)
    server = uvicorn.Server(config)
    ended: list[asyncio.Task[None]] = []

    def watch(task: asyncio.Task[None]) -> None:
        if not stop.is_set():
            ended.append(task)
            server.should_exit = True

    for task in tasks:
        task.add_done_callback(watch)
    try:
        await server.serve()
    finally:
        stop.set()
        done, pending = await asyncio.wait(tasks, timeout=10)
        for task in pending:
            task.cancel()
        for task in done:
            if task not in ended and not task.cancelled() and task.exception() is not None:
                log.error("loop %s ended with %r", task.get_name(), task.exception())
    if ended:
        whys = [f"{t.get_name()}: {'cancelled' if t.cancelled() else repr(t.exception())}"
                for t in ended]  # fmt: skip
        raise LoopEnded(f"loops ended while the service ran ({'; '.join(whys)})")


async def open_schema(
    settings: Settings,
    schema: str,
    steps: Sequence[Migration],
    server: Mapping[str, str] | None = None,
) -> asyncpg.Pool:
    """A pool on the service's own schema, migrated to the steps this code knows; `server`
    adds session settings (reporting's `work_mem`, say)."""
    pool = await create_pool(settings.dsn(), schema, server=server)
    async with pool.acquire() as conn:
        await migrate(conn, schema, steps)
    return pool


def run_service(main: Coroutine[Any, Any, None]) -> None:
    """Run a service's main coroutine, the collector tuned for batch work (shared.gctune); a
    signal ends it quietly (uvicorn re-raises SIGINT)."""
    tune_gc()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(main)
    except LoopEnded as ended:
        log.error("%s: exiting to be started again", ended)
        raise SystemExit(LOOP_ENDED) from None


def drain(due: Callable[[], Sequence[T]]) -> list[T]:
    """Run a page of due work until a page comes back empty; everything done, in order.
    Blocking: the schedulers run it in a worker thread."""
    done: list[T] = []
    while page := due():
        done.extend(page)
    return done


def scheduled(name: str, due: Callable[[], Sequence[Any]], every: float) -> Loop:
    """A service's scheduler: `drain(due)` now and then every `every` seconds until stopped;
    a failure is logged and tried again at the next tick."""
    return periodic(name, lambda: asyncio.to_thread(drain, due), every)


def periodic(name: str, work: Callable[[], Awaitable[Any]], every: float) -> Loop:
    """Run `work` now and then every `every` seconds until stopped; a failure (a library's own
    CancelledError included: shared.bus.loops) is logged and tried again at the next tick."""

    async def loop(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await work()
            except (Exception, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and being_cancelled():
                    raise
                log.exception("%s failed; trying again at the next tick", name)
            await sleep_or_stop(stop, every)

    return loop
