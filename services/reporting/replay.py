"""Rebuilding reporting's read models from the event stores (pipeline's opportunities, capture's
registrations) into a fresh schema while the live service keeps running; then either compare
it with the live tables row by row (`--verify`) or swap it in. Resumable: the fresh schema keeps
how far it read each store, and applying is idempotent."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO, TypeVar

import asyncpg

from services.reporting import bulk
from services.reporting.projection import FUNNEL_KEY, MIGRATIONS, POOL_SETTINGS, project
from shared.bus.consumer import apply_read_model
from shared.bus.envelopes import envelope_of
from shared.contracts.envelope import Envelope
from shared.runtime import open_schema
from shared.settings import Settings
from shared.store.db import create_pool
from shared.store.eventstore import EventStoreApp

# The read models a rebuild is compared on, by their keys.
COMPARED_TABLES = {
    "opportunity_now": ["opportunity_id"],
    "opportunity_history": ["opportunity_id", "version"],
    "stage_stay": ["opportunity_id", "left_at", "stage"],
    "payment": ["opportunity_id", "version"],
    "registration": ["registration_id"],
    "registration_conflict": ["registration_id", "partner_id", "lead_id"],
    "funnel_now": list(FUNNEL_KEY),
}
PAGE = 5000
T = TypeVar("T")
# Chunks of a set-based rebuild run at once, each on a connection (and a core) of the database.
BULK_WORKERS = 2


@dataclass
class Source:
    """An event store to read, which of its events reporting wants, and whether its history can
    be rebuilt set-based in the database first (`bulk`, the opportunity store's)."""

    name: str
    app: EventStoreApp
    wanted: Callable[[str], bool]
    bulk: bool = False

    @property
    def events_table(self) -> str:
        return f'"{self.app.schema}"."{self.app.name.lower()}_events"'


@dataclass
class Progress:
    total: int
    out: TextIO = sys.stderr
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    shown: float = 0.0

    def advance(self, count: int, final: bool = False) -> None:
        self.done += count
        now = time.monotonic()
        if not final and now - self.shown < 0.5:
            return
        self.shown = now
        rate = self.done / max(now - self.started, 1e-9)
        share = min(1.0, self.done / self.total) if self.total else 1.0
        left = (self.total - self.done) / rate if rate and self.total > self.done else 0.0
        bar = "#" * int(share * 30)
        end = "\n" if final or not self.out.isatty() else "\r"
        self.out.write(f"[{bar:<30}] {share:6.1%} {self.done:,}/{self.total:,} events"
                       f" {rate:,.0f}/s, {left:,.0f}s left{end}")  # fmt: skip
        self.out.flush()


async def _position(pool: asyncpg.Pool, source: str) -> int:
    await pool.execute(
        "CREATE TABLE IF NOT EXISTS replay_progress (source text PRIMARY KEY,"
        " position bigint NOT NULL)"
    )
    value = await pool.fetchval("SELECT position FROM replay_progress WHERE source = $1", source)
    return int(value or 0)


def _page(source: Source, position: int) -> tuple[list[Envelope], int, int]:
    """The next page of a store as envelopes reporting wants; the last position read and how
    many events were read."""
    notifications = source.app.notifications_after(position, PAGE)
    if not notifications:
        return [], position, 0
    wanted = [n for n in notifications if source.wanted(n.topic)]
    envelopes = [envelope_of(e) for e in source.app.to_events(wanted)]
    return envelopes, notifications[-1].id, len(notifications)


async def _set_position(
    conn: asyncpg.Connection | asyncpg.Pool, source: str, position: int
) -> None:
    await conn.execute(
        "INSERT INTO replay_progress (source, position) VALUES ($1, $2)"
        " ON CONFLICT (source) DO UPDATE SET position = $2",
        source,
        position,
    )


async def _share(workers: int, pool: asyncpg.Pool, work: list[T],
                 do: Callable[[asyncpg.Connection, T], Awaitable[None]]) -> None:  # fmt: skip
    """Do each piece of `work` in a transaction of its own, `workers` connections at a time."""

    async def worker() -> None:
        while work:
            piece = work.pop(0)
            async with pool.acquire() as conn, conn.transaction():
                await do(conn, piece)

    await asyncio.gather(*(worker() for _ in range(workers)))


async def rebuild_bulk(pool: asyncpg.Pool, source: Source, progress: Progress) -> tuple[int, int]:
    """A store's history up to its newest event when the rebuild began, set-based: chunks of
    streams, BULK_WORKERS at a time, each chunk in one transaction with its mark (so a resumed
    rebuild does only the chunks left), the written tables' secondary indexes made afterwards;
    then the funnel sums, and the position the event-by-event rebuild goes on from. Returns
    that position and the events read."""
    upto = await _position(pool, f"{source.name}:bulk-upto")
    if upto == 0:
        upto = source.app.process_recorder.max_notification_id() or 0
        if upto == 0:
            return 0, 0  # an empty store: nothing to rebuild
        async with pool.acquire() as conn:
            await bulk.set_indexes_aside(conn)
        await _set_position(pool, f"{source.name}:bulk-upto", upto)
    marks = await pool.fetch(
        "SELECT source FROM replay_progress WHERE source LIKE $1", f"{source.name}:bulk-chunk-%"
    )
    done = {row["source"] for row in marks}
    todo = [
        (mark, bounds)
        for n, bounds in enumerate(bulk.chunks(upto, BULK_WORKERS))
        if (mark := f"{source.name}:bulk-chunk-{n}") not in done
    ]
    read = 0

    async def chunk(
        conn: asyncpg.Connection, piece: tuple[str, tuple[uuid.UUID, uuid.UUID]]
    ) -> None:
        nonlocal read
        mark, bounds = piece
        count = await bulk.rebuild_chunk(conn, source.events_table, bounds, upto)
        await _set_position(conn, mark, 1)
        read += count
        progress.advance(count)

    async def index(conn: asyncpg.Connection, statement: str) -> None:
        await conn.execute(statement)

    await _share(BULK_WORKERS, pool, todo, chunk)
    async with pool.acquire() as conn:
        statements = await bulk.indexes_set_aside(conn)
    await _share(BULK_WORKERS, pool, statements, index)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("DROP TABLE IF EXISTS replay_index")
        await bulk.sum_funnel(conn)
        await _set_position(conn, source.name, upto)
    return upto, read


async def rebuild(pool: asyncpg.Pool, sources: Sequence[Source], progress: Progress) -> int:
    """Apply every wanted event of the stores into `pool`'s schema, from where it stopped: a
    store that allows it set-based up to where it stood when the rebuild began, then event by
    event, the next page read while this one is applied."""
    applied = 0
    for source in sources:
        position = await _position(pool, source.name)
        if position == 0 and source.bulk:
            position, read = await rebuild_bulk(pool, source, progress)
            applied += read
        pending = asyncio.create_task(asyncio.to_thread(_page, source, position))
        while True:
            envelopes, position, read = await pending
            if read == 0:
                break
            pending = asyncio.create_task(asyncio.to_thread(_page, source, position))
            if envelopes:
                applied += len(await apply_read_model(pool, envelopes, project))
            await _set_position(pool, source.name, position)
            progress.advance(read)
    progress.advance(0, final=True)
    return applied


async def differences(
    conn: asyncpg.Connection, live: str, fresh: str, limit: int = 1000
) -> list[dict[str, Any]]:
    """Every row that is in one schema's read-model tables and not the other's."""
    found: list[dict[str, Any]] = []
    for table, key in COMPARED_TABLES.items():
        for name, a, b in (("live only", live, fresh), ("rebuilt only", fresh, live)):
            rows = await conn.fetch(
                f'SELECT * FROM "{a}".{table} EXCEPT SELECT * FROM "{b}".{table}'
                f" ORDER BY {', '.join(key)} LIMIT {limit}"
            )
            for row in rows:
                values = {k: None if v is None else str(v) for k, v in row.items()}
                key_values = {k: values[k] for k in key}
                found.append({"table": table, "side": name, "key": key_values, "row": values})
    return found


async def swap(conn: asyncpg.Connection, live: str, fresh: str) -> str:
    """Put the rebuilt tables in the live schema in one transaction (table by table, so the
    live service's prepared statements are invalidated and find the new tables by name); the
    old ones go to a schema of their own, returned."""
    old = f"{live}_old_{int(time.time())}"
    async with conn.transaction():
        await conn.execute(f'CREATE SCHEMA "{old}"')
        for schema, target in ((live, old), (fresh, live)):
            tables = await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = $1", schema
            )
            for row in tables:
                await conn.execute(
                    f'ALTER TABLE "{schema}"."{row["tablename"]}" SET SCHEMA "{target}"'
                )
    await conn.execute(f'DROP SCHEMA "{fresh}"')
    return old


def sources(
    settings: Settings, pipeline: str = "pipeline", capture: str = "capture"
) -> list[Source]:
    from services.capture.app import CaptureApp
    from services.pipeline.app import PipelineApp

    return [
        Source("pipeline", PipelineApp(settings.dsn(), pipeline, 2), lambda _: True, bulk=True),
        # Of capture's events, only registrations (报备) are reported on; leads are not read.
        Source(
            "capture",
            CaptureApp(settings.dsn(), capture, 2),
            lambda topic: ":Registration." in topic,
        ),
    ]


async def open_rebuild(settings: Settings, schema: str) -> asyncpg.Pool:
    """The rebuild's schema, migrated. A rebuild under way that newer code resumes first makes
    again the indexes it set aside (`bulk.set_indexes_aside`), so that a new step dropping or
    replacing one finds it: a set-aside definition is of the schema it was taken from. The
    rebuild then goes on with them in place: slower, and right."""
    before = await create_pool(settings.dsn(), schema, max_size=1)
    try:
        async with before.acquire() as conn:
            if await conn.fetchval("SELECT to_regclass('replay_index')") is not None and (
                await conn.fetchval("SELECT max(version) FROM schema_version")
                < max(version for version, _ in MIGRATIONS)
            ):
                for statement in await bulk.indexes_set_aside(conn):
                    await conn.execute(statement)
                await conn.execute("DROP TABLE replay_index")
    finally:
        await before.close()
    return await open_schema(settings, schema, MIGRATIONS, server=POOL_SETTINGS)


async def replay(
    settings: Settings,
    verify: bool,
    live: str = "reporting",
    out: TextIO = sys.stderr,
    stores: Sequence[Source] | None = None,
) -> dict[str, Any]:
    """`dealstream replay reporting [--verify]`."""
    fresh = f"{live}_replay"
    pool = await open_rebuild(settings, fresh)
    stores = stores if stores is not None else sources(settings)
    try:
        total = 0
        for store in stores:
            latest = store.app.process_recorder.max_notification_id() or 0
            total += max(0, latest - await _position(pool, store.name))
        started = time.monotonic()
        applied = await rebuild(pool, stores, Progress(total, out))
        seconds = time.monotonic() - started
        async with pool.acquire() as conn:
            if verify:
                found = await differences(conn, live, fresh)
                return {"verified": not found, "differences": found, "applied": applied,
                        "seconds": seconds}  # fmt: skip
            old = await swap(conn, live, fresh)
            await conn.execute(f'DROP SCHEMA "{old}" CASCADE')
        # Events the live consumer applied to the old tables during the swap are in the stores:
        # one more pass from where the rebuild stopped puts them in the new ones.
        await pool.close()
        pool = await open_schema(settings, live, MIGRATIONS, server=POOL_SETTINGS)
        caught_up = await rebuild(pool, stores, Progress(0, out))
        return {"swapped": True, "applied": applied + caught_up, "seconds": seconds}
    finally:
        await pool.close()
        for s in stores:
            s.app.close()
