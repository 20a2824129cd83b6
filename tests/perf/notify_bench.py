"""Notify benchmark: with 100,000 open opportunities in notify's state, one tick fires 10,000 due
follow-up reminders to the Kafka channel (notification stored, delivery recorded, envelope acked
by the broker) — ours against a naive loop that claims, issues and publishes one reminder per
transaction."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import asyncpg

from services.notify.app import Notifier
from services.notify.delivery import envelope_value
from services.notify.firing import Channels, drafts_for_timer, store
from services.notify.timers import MIGRATIONS, picture_of
from shared.bus.kafka import make_producer
from shared.clock import FixedClock
from shared.contracts.topics import NOTIFICATION_EVENTS
from shared.runtime import open_schema
from shared.settings import Settings

OPEN = 100_000
DUE = 10_000
NAIVE_SAMPLE = 1_000  # the naive loop's rate is steady; a sample keeps `make bench` short
NOW = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


async def seed(pool: asyncpg.Pool) -> None:
    """100,000 open opportunities; the first 10,000 have a follow-up due by NOW, the others
    later; every one also has its stale and escalation timers (not due)."""
    await pool.execute(
        """
        INSERT INTO opportunity_picture
        SELECT gen_random_uuid(), 'Deal ' || n, 'Company ' || n, 'A', 'open', 'rep' || (n % 50),
               'east', 'normal', NULL,
               $1::timestamptz - interval '3 days' + CASE WHEN n > $2 THEN interval '2 days'
                                                          ELSE interval '0' END,
               gen_random_uuid(), NULL, $1::timestamptz - interval '3 days', gen_random_uuid(),
               gen_random_uuid()
        FROM generate_series(1, $3) AS n
        """,
        NOW,
        DUE,
        OPEN,
    )
    await pool.execute(
        """
        INSERT INTO timer (opportunity_id, kind, due_at, derived_from)
        SELECT opportunity_id, k.kind, clock_started_at + k.after, clock_event
        FROM opportunity_picture,
             (VALUES ('follow_up', interval '3 days'), ('escalate_manager', interval '5 days'),
                     ('stale', interval '30 days')) AS k(kind, after)
        """
    )
    await pool.execute("ANALYZE")


async def ours(settings: Settings, pool: asyncpg.Pool) -> tuple[float, int]:
    producer = make_producer(settings, linger_ms=5)
    await producer.start()
    try:
        started = time.perf_counter()
        done = await Notifier(pool, settings, producer, "bench").tick(FixedClock(NOW))
        seconds = time.perf_counter() - started
    finally:
        await producer.stop()
    assert done["notifications"] == DUE and done["sent"] == DUE, done
    return seconds, DUE


async def naive(settings: Settings, pool: asyncpg.Pool) -> tuple[float, int]:
    """The baseline: per due timer, one transaction that claims it, issues the reminder, and
    publishes it (waiting for the broker's ack) before committing."""
    rules, channels = settings.rules(), Channels.of(settings)
    producer = make_producer(settings)
    await producer.start()
    try:
        started = time.perf_counter()
        for _ in range(NAIVE_SAMPLE):
            async with pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(
                    "SELECT t.kind AS timer_kind, t.due_at AS timer_due, t.derived_from, p.*"
                    " FROM timer t JOIN opportunity_picture p USING (opportunity_id)"
                    " WHERE t.fired_at IS NULL AND t.due_at <= $1"
                    " ORDER BY t.due_at LIMIT 1 FOR UPDATE OF t SKIP LOCKED",
                    NOW,
                )
                assert row is not None
                drafts = drafts_for_timer(row["timer_kind"], picture_of(row), row["timer_due"],
                                          row["derived_from"], NOW, rules, channels)  # fmt: skip
                await store(conn, drafts)
                for d in drafts:
                    key, value = envelope_value(d.notification.model_dump_json())
                    await producer.send_and_wait(NOTIFICATION_EVENTS, value, key=key)
                await conn.execute(
                    "UPDATE delivery SET status = 'sent', attempts = 1, sent_at = $2"
                    " WHERE notification_id = ANY($1::uuid[])",
                    [d.notification.notification_id for d in drafts],
                    NOW,
                )
                await conn.execute(
                    "UPDATE timer SET fired_at = $3 WHERE opportunity_id = $1 AND kind = $2",
                    row["opportunity_id"],
                    row["timer_kind"],
                    NOW,
                )
        seconds = time.perf_counter() - started
    finally:
        await producer.stop()
    return seconds, NAIVE_SAMPLE


async def bench_reminders(settings: Settings) -> dict[str, Any]:
    rates = {}
    for label, run in (("naive", naive), ("ours", ours)):
        pool = await open_schema(settings, f"bench_notify_{label}", MIGRATIONS)
        try:
            await seed(pool)
            seconds, count = await run(settings, pool)
            rates[label] = count / seconds
            print(f"  {label}: {count} reminders in {seconds:.2f}s", flush=True)
        finally:
            await pool.close()
    return {
        "name": f"notify: due reminders -> Kafka, {OPEN:,} open (reminders/s)",
        "ours": rates["ours"],
        "baseline": rates["naive"],
        "baseline_name": "a transaction and an acked send per reminder",
    }
