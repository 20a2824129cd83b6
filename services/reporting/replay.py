"""Rebuilding reporting's read models from the event stores (pipeline's opportunities, capture's
registrations) into a fresh schema while the live service keeps running; then either compare
it with the live tables row by row (`--verify`) or swap it in. Resumable: the fresh schema keeps
how far it read each store, and applying is idempotent."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import asyncpg

from services.reporting.projection import FUNNEL_KEY, MIGRATIONS, POOL_SETTINGS, project
from shared.bus.consumer import apply_read_model
from shared.bus.envelopes import envelope_of
from shared.contracts.envelope import Envelope
from shared.runtime import open_schema
from shared.settings import Settings
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


@dataclass
class Source:
    """An event store to read, and which of its events reporting wants."""

    name: str
    app: EventStoreApp
    wanted: Callable[[str], bool]


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


async def rebuild(pool: asyncpg.Pool, sources: Sequence[Source], progress: Progress) -> int:
    """Apply every wanted event of the stores into `pool`'s schema, from where it stopped; the
    next page is read while this one is applied."""
    applied = 0
    for source in sources:
        position = await _position(pool, source.name)
        pending = asyncio.create_task(asyncio.to_thread(_page, source, position))
        while True:
            envelopes, position, read = await pending
            if read == 0:
                break
            pending = asyncio.create_task(asyncio.to_thread(_page, source, position))
            if envelopes:
                applied += len(await apply_read_model(pool, envelopes, project))
            await pool.execute(
                "INSERT INTO replay_progress (source, position) VALUES ($1, $2)"
                " ON CONFLICT (source) DO UPDATE SET position = $2",
                source.name,
                position,
            )
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
        Source("pipeline", PipelineApp(settings.dsn(), pipeline, 2), lambda _: True),
        # Of capture's events, only registrations (报备) are reported on; leads are not read.
        Source(
            "capture",
            CaptureApp(settings.dsn(), capture, 2),
            lambda topic: ":Registration." in topic,
        ),
    ]


async def replay(
    settings: Settings,
    verify: bool,
    live: str = "reporting",
    out: TextIO = sys.stderr,
    stores: Sequence[Source] | None = None,
) -> dict[str, Any]:
    """`dealstream replay reporting [--verify]`."""
    fresh = f"{live}_replay"
    pool = await open_schema(settings, fresh, MIGRATIONS, server=POOL_SETTINGS)
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
