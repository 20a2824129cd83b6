"""Reporting benchmarks: opportunity events applied per second from Kafka into the read models
(ours, batched, against a consumer that applies each event in its own transaction), and the p95
latency of every report route with 100,000 opportunities and 1,000,000 events loaded."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from services.reporting.api import create_api
from services.reporting.bus import opportunity_events
from services.reporting.projection import MIGRATIONS, SERVICE_POOL_SETTINGS, project
from shared.auth import Principal, Role, issue_token
from shared.bus.consumer import Batch, BatchConsumer, apply_read_model, records_of
from shared.bus.envelopes import decode_records
from shared.bus.kafka import make_producer
from shared.clock import FixedClock
from shared.contracts.envelope import HEADER_NOTIFICATION_ID, Envelope, event_id_for
from shared.contracts.topics import OPPORTUNITY_EVENTS
from shared.devstack import DevStack
from shared.runtime import open_schema
from shared.settings import Settings
from tests.perf.runs import median_of, schema_of

START = datetime(2025, 6, 1, tzinfo=UTC)
NOW = datetime(2026, 6, 1, tzinfo=UTC)
TEAMS = ("east", "west", "north", "south")
REASONS = ("price", "competitor", "no_budget", "timing")
KAFKA_EVENTS = 60_000
NAIVE_EVENTS = 4_000
LOADED_OPPORTUNITIES = 100_000  # about 10 events each: 1,000,000 events
LATENCY_SAMPLES = 40


def life(n: int, rng: random.Random) -> list[Envelope]:
    """One opportunity's events, valid against the contracts: opened, scored, assigned, then
    stage changes, follow-ups, an amount change, and won (with a payment), lost, or still open."""
    stream = uuid.uuid5(uuid.NAMESPACE_OID, f"bench-{n}")
    t = START + timedelta(minutes=rng.randrange(0, 60 * 24 * 330))
    events: list[tuple[str, datetime, dict[str, Any]]] = []
    amount = rng.choice(("15000.00", "30000.00", "80000.00", "250000.00"))
    owner = f"rep{n % 40}"
    team = TEAMS[n % 4]
    iso = lambda at: at.isoformat().replace("+00:00", "Z")  # noqa: E731
    oid = str(stream)
    events.append(("OpportunityOpened", t, {
        "opportunity_id": oid, "lead_id": str(uuid.uuid5(stream, "lead")), "title": f"Deal {n}",
        "stage": "A", "probability": 10, "amount": {"amount": amount, "currency": "CNY"},
        "source": "partner" if n % 3 == 0 else "web_form",
        "partner_id": f"p{n % 7}" if n % 3 == 0 else None, "company": f"Company {n}",
        "region": f"CN-{n % 5}", "industry": "retail", "expected_close":
        (t + timedelta(days=rng.randrange(20, 120))).date().isoformat(), "opened_at": iso(t),
    }))  # fmt: skip
    events.append(("OpportunityScored", t, {
        "opportunity_id": oid, "score": 50, "grade": "B", "budget": 25, "authority": 25,
        "need": 0, "timeline": 0, "tier": "normal",
    }))  # fmt: skip
    events.append(("OpportunityAssigned", t, {
        "opportunity_id": oid, "owner": owner, "team": team, "rule": "bench", "actor": "router",
        "assigned_at": iso(t),
    }))  # fmt: skip
    stages = "ABCDE"
    stage = "A"
    for _ in range(rng.randrange(1, 5)):
        t += timedelta(days=rng.randrange(1, 15))
        events.append(("FollowUpLogged", t, {
            "opportunity_id": oid, "channel": "call", "summary": "called", "stage": stage,
            "actor": owner, "logged_at": iso(t),
        }))  # fmt: skip
        t += timedelta(days=rng.randrange(1, 10))
        nxt = stages[stages.index(stage) + 1]
        events.append(("OpportunityStageChanged", t, {
            "opportunity_id": oid, "from_stage": stage, "to_stage": nxt,
            "probability": {"B": 25, "C": 50, "D": 75, "E": 90}[nxt], "actor": owner,
            "changed_at": iso(t),
        }))  # fmt: skip
        stage = nxt
        if stage == "C":
            events.append(("OpportunityAmountChanged", t, {
                "opportunity_id": oid, "kind": "proposal",
                "amount": {"amount": amount, "currency": "CNY"}, "tier": "normal",
                "actor": owner, "changed_at": iso(t),
            }))  # fmt: skip
    t += timedelta(days=rng.randrange(1, 10))
    events.append(("FollowUpLogged", t, {
        "opportunity_id": oid, "channel": "visit", "summary": "visited", "stage": stage,
        "actor": owner, "logged_at": iso(t),
    }))  # fmt: skip
    outcome = rng.random()
    t += timedelta(days=rng.randrange(1, 20))
    if stage == "E" and outcome < 0.7:
        events.append(("OpportunityWon", t, {
            "opportunity_id": oid, "contract_amount": {"amount": amount, "currency": "CNY"},
            "from_stage": "E", "actor": owner, "won_at": iso(t),
        }))  # fmt: skip
        t += timedelta(days=rng.randrange(5, 40))
        events.append(("PaymentReceived", t, {
            "opportunity_id": oid, "amount": {"amount": amount, "currency": "CNY"},
            "total_received": {"amount": amount, "currency": "CNY"}, "actor": "finance",
            "received_at": iso(t),
        }))  # fmt: skip
    elif outcome < 0.4:
        events.append(("OpportunityLost", t, {
            "opportunity_id": oid, "reason_code": rng.choice(REASONS), "stage": stage,
            "actor": owner, "lost_at": iso(t),
        }))  # fmt: skip
    return [
        Envelope.model_construct(
            event_id=event_id_for(stream, version),
            event_type=kind,
            schema_version=1,
            stream_id=stream,
            stream_version=version,
            occurred_at=at,
            correlation_id="bench",
            causation_id="bench",
            data=data,
        )
        for version, (kind, at, data) in enumerate(events, start=1)
    ]


def lives(first: int, count: int) -> list[Envelope]:
    rng = random.Random(first)
    return [e for n in range(first, first + count) for e in life(n, rng)]


async def produce(settings: Settings, envelopes: list[Envelope]) -> None:
    producer = make_producer(settings, linger_ms=20)
    await producer.start()
    try:
        acks = []
        for n, envelope in enumerate(envelopes, start=1):
            acks.append(await producer.send(
                OPPORTUNITY_EVENTS, envelope.model_dump_json().encode(),
                key=str(envelope.stream_id).encode(),
                headers=[(HEADER_NOTIFICATION_ID, str(n).encode())],
            ))  # fmt: skip
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


def naive_consumer(pool: Any, settings: Settings) -> BatchConsumer:
    async def handle(batch: Batch) -> None:
        for _position, envelope in decode_records(records_of(batch)):
            await apply_read_model(pool, [envelope], project)

    return BatchConsumer("naive-reporting", settings, "bench-naive", [OPPORTUNITY_EVENTS], handle)


async def from_kafka(stack: DevStack, label: str, run: int = 0) -> float:
    await asyncio.to_thread(stack.restart_broker)
    settings = stack.child_settings()
    envelopes = lives(0, KAFKA_EVENTS // 10)
    if label == "naive":
        envelopes = envelopes[:NAIVE_EVENTS]
    schema = schema_of(f"bench_reporting_{label}", run)
    pool = await open_schema(settings, schema, MIGRATIONS)
    await produce(settings, envelopes)
    consumer = (
        naive_consumer(pool, settings) if label == "naive" else opportunity_events(pool, settings)
    )
    if label == "ours":
        consumer.group_id = "bench-ours"
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    while not consumer.running:
        await asyncio.sleep(0.005)
    started = time.perf_counter()
    want = len(envelopes)
    applied = 0
    while applied < want:
        await asyncio.sleep(0.05)
        applied = await pool.fetchval("SELECT coalesce(sum(version), 0) FROM stream_position")
    seconds = time.perf_counter() - started
    stop.set()
    await task
    await pool.close()
    print(f"  {label}: {want} events from Kafka in {seconds:.2f}s", flush=True)
    return want / seconds


async def bench_reporting_consumer(stack: DevStack) -> dict[str, Any]:
    naive = await from_kafka(stack, "naive")
    return {
        "name": "reporting: opportunity events from Kafka -> read models (events/s)",
        **await median_of(lambda run: from_kafka(stack, "ours", run)),
        "baseline": naive,
        "baseline_name": "a transaction per event",
    }


async def bench_report_latency(settings: Settings) -> dict[str, Any]:
    """p95 of each report route over a loaded read model (100,000 opportunities)."""
    pool = await open_schema(
        settings, "bench_reporting_loaded", MIGRATIONS, server=SERVICE_POOL_SETTINGS
    )
    loaded = 0
    started = time.perf_counter()
    for first in range(0, LOADED_OPPORTUNITIES, 5000):
        envelopes = lives(first, 5000)
        for start in range(0, len(envelopes), 5000):
            await apply_read_model(pool, envelopes[start : start + 5000], project)
        loaded += len(envelopes)
    load_seconds = time.perf_counter() - started
    await pool.execute("VACUUM ANALYZE")  # settled, as autovacuum leaves a loaded table
    print(f"  loaded {loaded} events for {LOADED_OPPORTUNITIES} opportunities in"
          f" {load_seconds:.0f}s ({loaded / load_seconds:.0f} events/s)", flush=True)  # fmt: skip
    api = create_api(settings, pool, lambda: None, FixedClock(NOW))
    token = issue_token(Principal(role=Role.ops, user="bench"), settings.secret_for_tokens(),
                        datetime.now(UTC), timedelta(hours=1))  # fmt: skip
    quarter = {"from": "2026-01-01T00:00:00Z", "to": "2026-04-01T00:00:00Z"}
    routes = {
        "funnel": {}, "funnel by team": {"group_by": "team"}, "pass-through": quarter,
        "win-rate": quarter, "win-rate by owner": {**quarter, "group_by": "owner"},
        "cycle-time": quarter, "loss-reasons": quarter, "fresh": {}, "forecast": {},
        "partner-commissions": {}, "funnel as_of": {"as_of": "2026-01-15T00:00:00Z"},
    }  # fmt: skip
    p95: dict[str, float] = {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://r",
                                 headers={"Authorization": f"Bearer {token}"}) as http:  # fmt: skip
        for name, params in routes.items():
            path = name.split(" ")[0]
            timings = []
            for _ in range(LATENCY_SAMPLES):
                began = time.perf_counter()
                answer = await http.get(f"/v1/reports/{path}", params=params)
                timings.append(1000 * (time.perf_counter() - began))
                assert answer.status_code == 200, answer.text
            p95[name] = statistics.quantiles(timings, n=20)[-1]
    await pool.close()
    return {
        "name": "report routes, p95 ms (100,000 opportunities, 1,000,000 events)",
        "events": loaded,
        "p95_ms": p95,
    }
