"""The two idempotent consumers of ARCHITECTURE decision 2 on real PostgreSQL: upstream
notification ids tracked atomically with new events, and stream versions tracked atomically with
read-model rows. Redelivery, republishing, concurrent replicas and gaps."""

from __future__ import annotations

import asyncio
import uuid
from decimal import Decimal

from services.pipeline.app import MIGRATIONS as PIPELINE_MIGRATIONS
from services.pipeline.app import PipelineApp
from services.pipeline.domain import opportunity_id_for
from services.reporting.projection import MIGRATIONS as REPORTING_MIGRATIONS
from services.reporting.projection import project
from services.reporting.queries import Filters, funnel
from shared.bus.consumer import apply_read_model
from shared.settings import Rules, Settings
from tests.factories import lead_captured, moved, opened


async def test_tracked_consumer_applies_each_upstream_event_once(
    pipeline_store: PipelineApp,
) -> None:
    app = pipeline_store
    leads = [uuid.uuid4() for _ in range(4)]
    first = [
        (10, lead_captured(leads[0])),
        (12, lead_captured(leads[1])),
        (15, lead_captured(leads[2])),
    ]
    assert await asyncio.to_thread(app.apply_lead_events, "capture:p0", first, Rules()) == 3
    # The same batch again (a redelivery), then a republish that repeats it before a new one.
    assert await asyncio.to_thread(app.apply_lead_events, "capture:p0", first, Rules()) == 0
    republished = [*first, (16, lead_captured(leads[3]))]
    assert await asyncio.to_thread(app.apply_lead_events, "capture:p0", republished, Rules()) == 1
    assert app.tracked_position("capture:p0") == 16
    opened_ids = {opportunity_id_for(lead) for lead in leads}
    unknown = uuid.uuid4()
    assert app.existing_ids([*opened_ids, unknown]) == opened_ids
    # A page of streams read at once: each asked-for stream once, in order, even asked twice.
    some = sorted(opened_ids)[:2]
    histories = app.events_of([some[0], unknown, some[1], some[0]])
    assert list(histories) == [some[0], unknown, some[1]] and histories[unknown] == []
    for opportunity_id in some:
        assert [e.originator_version for e in histories[opportunity_id]] == [1, 2, 3]
        assert {e.originator_id for e in histories[opportunity_id]} == {opportunity_id}
    for lead in leads:
        opportunity = app.repository.get(opportunity_id_for(lead))
        assert opportunity.version == 3 and opportunity.stage == "A"  # opened, scored, assigned


async def test_a_fetch_of_several_partitions_is_applied_once_each_in_one_save(
    pipeline_store: PipelineApp,
) -> None:
    app = pipeline_store
    leads = [uuid.uuid4() for _ in range(5)]
    # Partition 1 had been applied up to 4 alone, before this fetch of two partitions.
    assert app.apply_lead_events("capture:p1", [(4, lead_captured(leads[0]))], Rules()) == 1
    fetch = [
        ("capture:p0", 3, lead_captured(leads[1])),
        ("capture:p1", 4, lead_captured(leads[0])),  # applied already: skipped
        ("capture:p1", 9, lead_captured(leads[2])),
        ("capture:p0", 5, lead_captured(leads[3])),
    ]
    assert await asyncio.to_thread(app.apply_tracked_lead_events, fetch, Rules()) == 3
    assert app.tracked_positions(["capture:p0", "capture:p1"]) == {
        "capture:p0": 5,
        "capture:p1": 9,
    }
    # The same fetch again (a redelivery), then one that goes on past it on one partition.
    assert await asyncio.to_thread(app.apply_tracked_lead_events, fetch, Rules()) == 0
    more = [*fetch, ("capture:p1", 10, lead_captured(leads[4]))]
    assert await asyncio.to_thread(app.apply_tracked_lead_events, more, Rules()) == 1
    opened_ids = {opportunity_id_for(lead) for lead in leads}
    assert app.existing_ids(list(opened_ids)) == opened_ids
    for lead in leads:
        assert app.repository.get(opportunity_id_for(lead)).version == 3  # each opened once


async def test_two_replicas_racing_on_one_partition_store_it_once(
    settings: Settings,
    schema: str,
    open_pool,  # type: ignore[no-untyped-def]
) -> None:
    await open_pool(schema, PIPELINE_MIGRATIONS)
    apps = [await asyncio.to_thread(PipelineApp, settings.dsn(), schema) for _ in range(2)]
    items = [(n, lead_captured(uuid.uuid4())) for n in range(1, 201)]
    applied = await asyncio.gather(
        *(asyncio.to_thread(a.apply_lead_events, "capture:p3", items, Rules()) for a in apps)
    )
    assert sorted(applied) == [0, 200]
    opened_ids = [opportunity_id_for(uuid.UUID(e.data["lead_id"])) for _, e in items]
    assert len(apps[0].existing_ids(opened_ids)) == 200
    for a in apps:
        a.close()


async def test_read_model_skips_what_it_applied_and_records_gaps(
    settings: Settings,
    schema: str,
    open_pool,  # type: ignore[no-untyped-def]
) -> None:
    pool = await open_pool(schema, REPORTING_MIGRATIONS)
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    batch = [opened(a, "100000.00"), opened(b, "20000.00"), moved(a, 2, "A", "B", 25)]
    assert len(await apply_read_model(pool, batch, project)) == 3
    # Delivered twice, and out of order across streams: nothing changes.
    assert await apply_read_model(pool, list(reversed(batch)), project) == []
    assert (
        await apply_read_model(pool, [moved(a, 2, "A", "B", 25), opened(b, "20000.00")], project)
        == []
    )
    # A gap: version 4 of c before its 1..3 is not applied, and is recorded.
    assert await apply_read_model(pool, [moved(c, 4, "B", "C", 50)], project) == []
    gap = await pool.fetchrow(
        "SELECT expected_version, received_version FROM stream_gap WHERE stream_id = $1", c
    )
    assert (gap["expected_version"], gap["received_version"]) == (1, 4)
    report = await funnel(pool, Filters(), Rules())
    counts = {s["stage"]: s["count"] for s in report["rows"]}
    assert counts == {"A": 1, "B": 1, "C": 0, "D": 0, "E": 0, "F": 0}
    stage_b = next(s for s in report["rows"] if s["stage"] == "B")
    assert stage_b["amount"] == Decimal("100000.00")
    assert stage_b["weighted"] == Decimal("25000.00")


async def test_read_model_replicas_racing_apply_a_new_stream_once(
    settings: Settings,
    schema: str,
    open_pool,  # type: ignore[no-untyped-def]
) -> None:
    pool = await open_pool(schema, REPORTING_MIGRATIONS)
    streams = [uuid.uuid4() for _ in range(50)]
    batch = [opened(s, "1000.00") for s in streams]
    results = await asyncio.gather(*(apply_read_model(pool, batch, project) for _ in range(3)))
    assert sorted(len(r) for r in results) == [0, 0, 50]
    assert await pool.fetchval("SELECT count(*) FROM opportunity_now") == 50
