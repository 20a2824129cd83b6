"""`replay reporting`'s set-based rebuild (services/reporting/bulk.py) against the live
projection: opportunities living every kind of life the pipeline allows (moves forward and back,
overrides, amount changes, wins with payments, losses and reopenings, reassignment, recycling
and reactivation, attached leads, several events at one moment and a clock set back) are stored
in a real pipeline store; the read models rebuilt from it in the database equal, table by table,
those the live projection writes from the same events. An interrupted rebuild, resumed, too."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from services.pipeline.app import MIGRATIONS as PIPELINE_MIGRATIONS
from services.pipeline.app import PipelineApp
from services.pipeline.domain import Opportunity, Refused
from services.pipeline.rules import Route
from services.reporting import bulk
from services.reporting.projection import MIGRATIONS, project
from services.reporting.replay import (
    COMPARED_TABLES,
    Progress,
    Source,
    differences,
    open_rebuild,
    rebuild,
)
from shared.bus.consumer import apply_read_model
from shared.bus.envelopes import envelope_of
from shared.contracts.events import LeadCaptured
from shared.settings import STAGES, Settings
from tests.reporting_scenario import RULES, money
from tests.support import eventually

START = datetime(2026, 1, 5, 9, tzinfo=UTC)
LIVES = 600


def forward(o: Opportunity) -> str:
    return STAGES[min(STAGES.index(o.stage) + 1, len(STAGES) - 1)]


def back(o: Opportunity) -> str:
    return STAGES[max(STAGES.index(o.stage) - 1, 0)]


def live(n: int, rng: random.Random) -> Opportunity:
    """One opportunity's life: random commands, each kept when the rules allow it."""
    at = START + timedelta(hours=rng.randrange(0, 24 * 200))
    budget = rng.choice([None, {"amount": f"{rng.randrange(1, 900) * 1000}.00", "currency": "CNY"}])
    lead = LeadCaptured.model_validate({
        "lead_id": str(uuid.uuid5(uuid.NAMESPACE_OID, f"bulk-{n}")),
        "source": rng.choice(["web_form", "partner"]), "partner_id": rng.choice([None, "acme"]),
        "captured_at": at,
        "company": {"name": f"Company {n}", "region": rng.choice(["CN-SH", None]),
                                       "industry": rng.choice(["retail", None])},
        "contact": {"name": "Li"}, "budget": budget,
        "authority": rng.choice(["decision_maker", "influencer"]),
        "expected_close": rng.choice([None, "2026-09-30"]),
    })  # fmt: skip
    o = Opportunity.open_from_lead(lead, RULES, Route(f"rep{n % 7}", f"team{n % 3}", "test"),
                                   "e", "c")  # fmt: skip
    actor = "rep"
    clock = [at]

    def tick() -> datetime:
        step = rng.random()
        if step < 0.15:
            pass  # the same moment as the event before
        elif step < 0.2:
            clock[0] -= timedelta(hours=1)  # a clock set back
        else:
            clock[0] += timedelta(hours=rng.randrange(1, 24 * 12))
        return clock[0]

    def advance() -> None:
        if o.missing_exit_criteria(RULES):
            o.change_amount("proposal", money(rng.randrange(1, 500) * 100), actor, tick(), RULES)
            o.log_follow_up("call", "the boss", actor, tick(), authority="decision_maker")
        if o.stage == "E":
            o.win(money(rng.randrange(1, 500) * 100), actor, tick(), RULES)
            for _ in range(rng.randrange(0, 3)):
                o.receive_payment(money(rng.randrange(1, 50) * 100), "finance", tick())
        else:
            o.change_stage(forward(o), actor, tick(), RULES)

    def idle() -> None:
        clock[0] += timedelta(days=RULES.recycle_days + 1)
        o.recycle(clock[0], RULES)
        if rng.random() < 0.7:
            o.reactivate(rng.choice([None, "rep.y"]), "team2", "mgr", tick())

    def leads() -> None:  # a lead merged in, or one merged before unmerged again
        if len(o.lead_ids) > 1 and rng.random() < 0.4:
            o.detach_lead(rng.choice(o.lead_ids[1:]), uuid.uuid4(), "mgr", tick())
        else:
            o.attach_lead(uuid.uuid5(uuid.NAMESPACE_OID, f"bulk-{n}-{clock[0]}"), "email", tick())

    commands = [
        advance, advance, advance, advance, idle,
        lambda: o.change_stage(back(o), actor, tick(), RULES, note="not yet"),
        lambda: o.override_probability(rng.randrange(0, 101), actor, tick(), note="gut"),
        lambda: o.change_amount("estimate", money(rng.randrange(1, 500) * 100), actor, tick(),
                                RULES),
        lambda: o.log_follow_up("call", "called", actor, tick()),
        lambda: o.lose(rng.choice(RULES.loss_reasons), actor, tick(), RULES, note="n",
                       competitor=rng.choice([None, "rival"])),
        lambda: o.reopen("mgr", tick(), RULES, note="called back"),
        lambda: o.reopen("mgr", tick(), RULES, note="called back"),
        lambda: o.assign(rng.choice([None, "rep.x"]), rng.choice([None, "team9"]), "mgr", tick()),
        leads,
    ]  # fmt: skip
    for _ in range(rng.randrange(0, 16)):
        with contextlib.suppress(Refused, ValueError):
            rng.choice(commands)()
    return o


async def indexes(pool: asyncpg.Pool) -> list[str]:
    return sorted(
        row["indexname"]
        for row in await pool.fetch(
            "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
            " AND indexname NOT LIKE 'replay%'"
        )
    )


async def tables(pool: asyncpg.Pool) -> dict[str, int]:
    return {t: int(await pool.fetchval(f"SELECT count(*) FROM {t}")) for t in COMPARED_TABLES}


async def marked_chunks(pool: asyncpg.Pool) -> int:
    try:
        return int(await pool.fetchval(
            "SELECT count(*) FROM replay_progress WHERE source LIKE 'pipeline:bulk-chunk-%'"
        ))  # fmt: skip
    except asyncpg.UndefinedTableError:
        return 0


async def test_the_set_based_rebuild_equals_the_live_projection_over_every_kind_of_life(
    settings: Settings, schema: str, open_pool: Any, monkeypatch: Any
) -> None:
    monkeypatch.setattr(bulk, "CHUNK_EVENTS", 400)  # several chunks, streams on both sides
    store = f"{schema}_p"
    await open_pool(store, PIPELINE_MIGRATIONS)
    app = await asyncio.to_thread(PipelineApp, settings.dsn(), store, 2)
    try:
        rng = random.Random(2026)
        opportunities = [live(n, rng) for n in range(LIVES)]
        await asyncio.to_thread(app.save, opportunities)
        notifications = await asyncio.to_thread(app.notifications_after, 0, 100_000)
        envelopes = [envelope_of(e) for e in app.to_events(notifications)]
        kinds = Counter(e.event_type for e in envelopes)
        # Every reportable kind of event was lived, many times.
        assert min(kinds[k] for k in bulk.KINDS) >= 20, kinds

        live_pool = await open_pool(f"{schema}_live", MIGRATIONS)
        for start in range(0, len(envelopes), 300):  # as the live consumer applies its batches
            await apply_read_model(live_pool, envelopes[start : start + 300], project)

        rebuilt = await open_pool(f"{schema}_bulk", MIGRATIONS)
        source = Source("pipeline", app, lambda _: True, bulk=True)
        applied = await rebuild(rebuilt, [source], Progress(len(envelopes)))
        assert applied == len(envelopes)
        async with rebuilt.acquire() as conn:
            assert await differences(conn, f"{schema}_live", f"{schema}_bulk") == []
        assert await indexes(rebuilt) == await indexes(live_pool)  # made again after the chunks
        counts = await tables(rebuilt)
        assert counts == await tables(live_pool)
        assert all(counts[t] > 0 for t in COMPARED_TABLES if "registration" not in t), counts

        # Interrupted after its first chunks, then resumed: the same tables.
        resumed = await open_pool(f"{schema}_resumed", MIGRATIONS)
        task = asyncio.create_task(rebuild(resumed, [source], Progress(len(envelopes))))
        marked = await eventually(
            lambda: marked_chunks(resumed), lambda n: n > 0 or task.done(), every=0.001
        )
        assert marked > 0 and not task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        chunks = len(bulk.chunks(len(envelopes)))
        assert 0 < await marked_chunks(resumed) < chunks
        await rebuild(resumed, [source], Progress(len(envelopes)))
        assert await marked_chunks(resumed) == chunks
        assert await indexes(resumed) == await indexes(live_pool)
        async with resumed.acquire() as conn:
            assert await differences(conn, f"{schema}_live", f"{schema}_resumed") == []
    finally:
        app.close()


async def test_an_empty_store_rebuilds_to_empty_tables_again_and_again(
    settings: Settings, schema: str, open_pool: Any
) -> None:
    store = f"{schema}_p"
    await open_pool(store, PIPELINE_MIGRATIONS)
    app = await asyncio.to_thread(PipelineApp, settings.dsn(), store, 2)
    try:
        rebuilt = await open_pool(f"{schema}_bulk", MIGRATIONS)
        source = Source("pipeline", app, lambda _: True, bulk=True)
        for _ in range(2):
            assert await rebuild(rebuilt, [source], Progress(0)) == 0
            assert set((await tables(rebuilt)).values()) == {0}
        live_pool = await open_pool(f"{schema}_live", MIGRATIONS)
        assert await indexes(rebuilt) == await indexes(live_pool)
    finally:
        app.close()


async def test_a_rebuild_resumed_by_newer_code_migrates_with_its_indexes_in_place(
    settings: Settings, schema: str, open_pool: Any
) -> None:
    """A rebuild set its indexes aside under migration 9; newer code resumes it. Migration 10
    drops or replaces some of them: it finds them all in place, and none of the old ones comes
    back at the rebuild's end."""
    before = await open_pool(schema, [m for m in MIGRATIONS if m[0] < 10])
    async with before.acquire() as conn:
        await bulk.set_indexes_aside(conn)
    await before.close()
    after = await open_rebuild(settings, schema)
    try:
        async with after.acquire() as conn:
            assert await bulk.indexes_set_aside(conn) == []  # all made again before migrating
            rows = await conn.fetch(
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
            )
    finally:
        await after.close()
    names = {r["indexname"] for r in rows}
    assert {"opportunity_history_span", "stage_stay_stage", "opportunity_now_opened",
            "payment_received"} <= names  # fmt: skip
    assert not names & {"opportunity_history_as_of", "opportunity_history_valid_to",
                        "stage_stay_period"}  # fmt: skip
