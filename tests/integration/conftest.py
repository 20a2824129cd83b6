"""Integration fixtures: each test gets its own schemas in the session's real PostgreSQL, and
runs real relays and consumers against the session's real broker."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

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
