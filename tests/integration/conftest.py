"""Integration fixtures: each test gets its own schemas in the session's real PostgreSQL, and
runs real relays and consumers against the session's real broker."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from services.capture.app import MIGRATIONS as CAPTURE_MIGRATIONS
from services.capture.app import CaptureApp
from services.capture.bus import partner_intake
from services.capture.bus import route as capture_route
from services.capture.partners import PartnerSecrets, add_partner
from services.pipeline.app import MIGRATIONS as PIPELINE_MIGRATIONS
from services.pipeline.app import PipelineApp
from shared.bus.kafka import create_topics
from shared.bus.relay import OutboxRelay
from shared.clock import SystemClock
from shared.contracts.topics import partner_replies
from shared.runtime import open_schema
from shared.settings import Settings
from shared.store.migrations import Migration

Loop = Callable[[asyncio.Event], Awaitable[None]]


@pytest.fixture
def schema() -> str:
    return f"t_{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def open_pool(
    settings: Settings,
) -> AsyncIterator[Callable[[str, list[Migration]], Awaitable[asyncpg.Pool]]]:
    pools: list[asyncpg.Pool] = []

    async def opener(schema: str, steps: list[Migration]) -> asyncpg.Pool:
        pool = await open_schema(settings, schema, steps)
        pools.append(pool)
        return pool

    yield opener
    for pool in pools:
        await pool.close()


@pytest.fixture
async def pipeline_store(
    settings: Settings,
    schema: str,
    open_pool,  # type: ignore[no-untyped-def]
) -> AsyncIterator[PipelineApp]:
    """Pipeline's event store on a schema of the test's own, migrated; closed after."""
    await open_pool(schema, PIPELINE_MIGRATIONS)
    app = await asyncio.to_thread(PipelineApp, settings.dsn(), schema)
    yield app
    app.close()


@pytest.fixture
async def background() -> AsyncIterator[Callable[[Loop], asyncio.Event]]:
    """Start relay/consumer loops for the test; each gets its own stop event."""
    running: list[tuple[asyncio.Event, asyncio.Task[None]]] = []

    def start(loop: Loop) -> asyncio.Event:
        stop = asyncio.Event()
        running.append((stop, asyncio.create_task(loop(stop))))
        return stop

    yield start
    for stop, _ in running:
        stop.set()
    for _, task in running:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 15)


@pytest.fixture
async def intake(settings: Settings, schema: str, open_pool, background):  # type: ignore[no-untyped-def]
    """Capture's partner intake and relay on their own schema, with one registered partner."""
    app, partner, secret = await start_intake(settings, schema, open_pool, background)
    yield app, partner, secret
    app.close()


async def start_intake(settings: Settings, schema: str, open_pool, background,  # type: ignore[no-untyped-def]
                       secrets_ttl: float = 0.5) -> tuple[CaptureApp, str, str]:  # fmt: skip
    """`intake`'s parts, started: the app (the caller closes it), a partner and its secret."""
    pool = await open_pool(schema, CAPTURE_MIGRATIONS)
    app = await asyncio.to_thread(CaptureApp, settings.dsn(), schema)
    partner, secret = await register_partner(settings, pool, "p")
    consumer = partner_intake(app, settings, PartnerSecrets(pool, ttl=secrets_ttl), SystemClock())
    consumer.group_id = f"capture-{schema}"
    background(OutboxRelay("capture", app, capture_route, settings, pool).run)
    background(consumer.run)
    return app, partner, secret


async def register_partner(settings: Settings, pool: asyncpg.Pool, prefix: str) -> tuple[str, str]:
    """A new partner with its replies topic, as `dealstream partner add` makes one."""
    partner = f"{prefix}{uuid.uuid4().hex[:8]}"
    secret = await add_partner(pool, partner)
    await create_topics(settings, [partner_replies(partner)])
    return partner, secret
