"""Operations benchmarks over a pipeline store of 100,000 opportunities: `replay reporting`'s rate
(every stored event read and folded into a fresh read model, set-based in PostgreSQL as the
command does it) side by side with a plain SELECT scan of the same event table, and `audit lost`
over all of them."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg.sql import SQL, Identifier

from services.pipeline.app import MIGRATIONS as PIPELINE_MIGRATIONS
from services.pipeline.app import PipelineApp
from services.pipeline.audit import audit_lost
from services.pipeline.domain import Opportunity
from services.pipeline.rules import Route
from services.reporting.projection import MIGRATIONS, POOL_SETTINGS
from services.reporting.replay import Progress, Source, rebuild
from shared.contracts.events import LeadCaptured
from shared.runtime import open_schema
from shared.settings import Rules, Settings

OPPORTUNITIES = 100_000
START = datetime(2025, 6, 1, tzinfo=UTC)
SCHEMA = "bench_ops_pipeline"


def life(n: int, rng: random.Random, rules: Rules) -> Opportunity:
    at = START + timedelta(minutes=rng.randrange(0, 60 * 24 * 300))
    lead = LeadCaptured.model_validate({
        "lead_id": str(uuid.uuid5(uuid.NAMESPACE_OID, f"ops-{n}")), "source": "web_form",
        "captured_at": at, "company": {"name": f"Company {n}", "region": "CN-SH"},
        "contact": {"name": "Li"}, "budget": {"amount": "50000.00", "currency": "CNY"},
        "authority": "decision_maker",
    })  # fmt: skip
    o = Opportunity.open_from_lead(lead, rules, Route(f"rep{n % 30}", f"team{n % 4}", "bench"),
                                   "e", "c")  # fmt: skip
    roll = rng.random()
    at += timedelta(days=rng.randint(1, 9))
    o.log_follow_up("call", "called", o.owner or "x", at)
    if roll < 0.3:
        o.change_stage("B", o.owner or "x", at + timedelta(days=2), rules)
        o.lose(rng.choice(("price", "competitor", "timing")), o.owner or "x",
               at + timedelta(days=rng.randint(10, 30)), rules, note="bench")  # fmt: skip
    return o


async def load(settings: Settings, rules: Rules) -> PipelineApp:
    await (await open_schema(settings, SCHEMA, PIPELINE_MIGRATIONS)).close()
    app = await asyncio.to_thread(PipelineApp, settings.dsn(), SCHEMA, 4)
    rng = random.Random(11)
    started = time.perf_counter()

    def save_all() -> None:
        for first in range(0, OPPORTUNITIES, 1000):
            app.save([life(n, rng, rules) for n in range(first, first + 1000)])

    await asyncio.to_thread(save_all)
    print(f"  stored {OPPORTUNITIES} opportunities in {time.perf_counter() - started:.0f}s",
          flush=True)  # fmt: skip
    return app


def raw_scan(app: PipelineApp) -> tuple[int, float]:
    """A plain SELECT of every stored event, paged by notification id as replay reads."""
    table = SQL("{}.{}").format(Identifier(SCHEMA), Identifier("pipeline_events"))
    started = time.perf_counter()
    count, position = 0, 0
    while True:
        rows = app.query(
            SQL("SELECT * FROM {} WHERE notification_id > %s ORDER BY notification_id"
                " LIMIT 5000").format(table), [position],
        )  # fmt: skip
        if not rows:
            break
        count += len(rows)
        position = rows[-1]["notification_id"]
    return count, time.perf_counter() - started


ROUNDS = 3  # the scan and the replay each measured this many times, alternately


async def bench_operations(settings: Settings) -> dict[str, Any]:
    """The scan and the replay alternate, ROUNDS times each, each replay into a fresh schema;
    the median of each is reported (single runs on this shared machine swing by half)."""
    rules = Rules()
    app = await load(settings, rules)
    try:
        raw_times, replay_times = [], []
        for round_ in range(ROUNDS):
            raw_count, seconds = await asyncio.to_thread(raw_scan, app)
            raw_times.append(seconds)
            schema = f"bench_ops_replay_{round_}"
            pool = await open_schema(settings, schema, MIGRATIONS, server=POOL_SETTINGS)
            started = time.perf_counter()
            applied = await rebuild(pool, [Source("pipeline", app, lambda _: True, bulk=True)],
                                    Progress(raw_count))  # fmt: skip
            replay_times.append(time.perf_counter() - started)
            await pool.execute(f'DROP SCHEMA "{schema}" CASCADE')
            await pool.close()
        raw_seconds, replay_seconds = statistics.median(raw_times), statistics.median(replay_times)
        started = time.perf_counter()
        report = await asyncio.to_thread(audit_lost, app, rules)
        audit_seconds = time.perf_counter() - started
    finally:
        app.close()
    print(f"  raw scan {raw_count} events in {raw_seconds:.1f}s; replay applied {applied} in"
          f" {replay_seconds:.1f}s; audit lost: {report['summary']['lost']} deals in"
          f" {audit_seconds:.1f}s", flush=True)  # fmt: skip
    return {
        "replay": {
            "name": "replay reporting: stored events -> fresh read model (events/s)",
            "ours": raw_count / replay_seconds,
            "baseline": raw_count / raw_seconds,
            "baseline_name": "plain SELECT scan of the same event table",
            "detail": {
                "rounds": ROUNDS,
                "raw_seconds": raw_times,
                "replay_seconds": replay_times,
            },
        },
        "audit": {
            "name": f"audit lost over {OPPORTUNITIES:,} opportunities",
            "seconds": audit_seconds,
            "lost_deals": report["summary"]["lost"],
        },
    }
