"""Pipeline benchmarks: opportunities opened from `lead.events.v1` into the store and out on
`opportunity.events.v1` (ours vs a consumer that saves each lead in its own transaction), and
the latency from a stage-change command to its event on Kafka at a steady command rate."""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from services.pipeline.api import create_api
from services.pipeline.app import MIGRATIONS, PipelineApp
from services.pipeline.bus import lead_events, route
from shared.auth import Principal, Role, issue_token
from shared.bus.consumer import BatchConsumer, Record
from shared.bus.envelopes import decode_records
from shared.bus.kafka import make_producer
from shared.bus.relay import OutboxRelay
from shared.clock import SystemClock
from shared.contracts.envelope import HEADER_NOTIFICATION_ID
from shared.contracts.topics import LEAD_EVENTS, OPPORTUNITY_EVENTS
from shared.devstack import DevStack
from shared.runtime import open_schema
from shared.settings import Settings
from tests.factories import lead_captured

OPEN_N = 5000


async def produce_leads(settings: Settings, count: int, first_id: int) -> None:
    producer = make_producer(settings, linger_ms=20)
    await producer.start()
    try:
        acks = []
        for n in range(count):
            envelope = lead_captured(uuid.uuid4())
            acks.append(
                await producer.send(
                    LEAD_EVENTS,
                    envelope.model_dump_json().encode(),
                    key=str(envelope.stream_id).encode(),
                    headers=[(HEADER_NOTIFICATION_ID, str(first_id + n).encode())],
                )
            )
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


def naive_consumer(app: PipelineApp, settings: Settings, group: str) -> BatchConsumer:
    """The baseline: every lead event saved in its own transaction."""
    rules = settings.rules()

    async def handle(partition: TopicPartition, records: list[Record]) -> None:
        for item in decode_records(records):
            await asyncio.to_thread(
                app.apply_lead_events, f"capture:p{partition.partition}", [item], rules
            )

    return BatchConsumer("naive", settings, group, [LEAD_EVENTS], handle)


async def opened_per_second(settings: Settings, label: str, first_id: int) -> float:
    schema = f"bench_open_{label}"
    pool = await open_schema(settings, schema, MIGRATIONS)
    app = await asyncio.to_thread(PipelineApp, settings.dsn(), schema, 8)
    if label == "ours":
        consumer = lead_events(app, settings)
        consumer.group_id = f"bench-{label}"
    else:
        consumer = naive_consumer(app, settings, f"bench-{label}")
    relay = OutboxRelay(f"bench-{label}", app, route, settings, pool)
    # The leads wait on the topic (as capture's relay left them); the clock runs from the
    # consumer's partition assignment until the last opportunity event is acked by the broker.
    await produce_leads(settings, OPEN_N, first_id)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(consumer.run(stop)), asyncio.create_task(relay.run(stop))]
    while not consumer.running:
        await asyncio.sleep(0.005)
    started = time.perf_counter()
    want = OPEN_N * 3  # opened, scored, assigned
    while relay.published < want:
        await asyncio.sleep(0.01)
    seconds = time.perf_counter() - started
    print(f"  {label}: {OPEN_N} leads in {consumer.batches} partition batches", flush=True)
    stop.set()
    await asyncio.gather(*tasks)
    app.close()
    await pool.close()
    return OPEN_N / seconds


async def bench_opening(stack: DevStack) -> dict[str, Any]:
    # Each run gets a fresh, empty broker, so both read exactly their own OPEN_N leads.
    await asyncio.to_thread(stack.restart_broker)
    naive = await opened_per_second(stack.child_settings(), "naive", 1)
    await asyncio.to_thread(stack.restart_broker)
    ours = await opened_per_second(stack.child_settings(), "ours", 1)
    return {
        "name": "pipeline: leads in -> opportunities stored and on Kafka (opportunities/s)",
        "ours": ours,
        "baseline": naive,
        "baseline_name": "a transaction per lead",
    }


async def bench_command_latency(
    settings: Settings, rate: float = 200.0, seconds: float = 10.0
) -> dict[str, Any]:
    """Stage-change commands over HTTP at `rate`/s; latency until each event is read back from
    `opportunity.events.v1` by a plain consumer."""
    schema = "bench_latency"
    pool = await open_schema(settings, schema, MIGRATIONS)
    app = await asyncio.to_thread(PipelineApp, settings.dsn(), schema, 8)
    count = int(rate * seconds)
    items = [(n, lead_captured(uuid.uuid4())) for n in range(1, count + 1)]
    for start in range(0, count, 500):
        await asyncio.to_thread(app.apply_lead_events, "capture:p0", items[start : start + 500],
                                settings.rules())  # fmt: skip
    ids = [
        row["opportunity_id"]
        for row in await pool.fetch("SELECT opportunity_id FROM opportunity_index")
    ]
    stop = asyncio.Event()
    relay = OutboxRelay("bench-latency", app, route, settings, pool)
    relay_task = asyncio.create_task(relay.run(stop))
    while relay.published < count * 3:
        await asyncio.sleep(0.05)
    api = create_api(app, settings, pool, SystemClock(), lambda: None)
    token = issue_token(Principal(role=Role.admin, user="bench"), settings.secret_for_tokens(),
                        datetime.now(UTC), timedelta(hours=1))  # fmt: skip
    sent: dict[str, float] = {}
    latencies: list[float] = []
    consumer = AIOKafkaConsumer(OPPORTUNITY_EVENTS, bootstrap_servers=settings.bootstrap_servers(),
                                auto_offset_reset="latest", group_id=None)  # fmt: skip
    await consumer.start()
    await consumer.seek_to_end()

    async def listen() -> None:
        while len(latencies) < count:
            for records in (await consumer.getmany(timeout_ms=100)).values():
                now = time.perf_counter()
                for record in records:
                    key = record.key.decode()
                    if key in sent and b"OpportunityStageChanged" in record.value:
                        latencies.append(now - sent.pop(key))

    listener = asyncio.create_task(listen())
    transport = httpx.ASGITransport(api)
    async with httpx.AsyncClient(transport=transport, base_url="http://p",
                                 headers={"Authorization": f"Bearer {token}"}) as http:  # fmt: skip
        interval = 1.0 / rate
        began = time.perf_counter()
        pending = []
        for n, opportunity in enumerate(ids):
            await asyncio.sleep(max(0.0, began + n * interval - time.perf_counter()))
            sent[str(opportunity)] = time.perf_counter()
            body = {"expected_version": 3, "to_stage": "B"}
            url = f"/v1/opportunities/{opportunity}/stage"
            pending.append(asyncio.create_task(http.post(url, json=body)))
        answers = await asyncio.gather(*pending)
        achieved = count / (time.perf_counter() - began)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(listener, 30)
    await consumer.stop()
    stop.set()
    await relay_task
    app.close()
    await pool.close()
    ok = sum(1 for a in answers if a.status_code == 200)
    ordered = sorted(latencies)
    return {
        "name": f"stage command -> event on Kafka at {rate:.0f}/s (ms)",
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[int(len(ordered) * 0.99) - 1],
        "commands": count,
        "accepted": ok,
        "received": len(latencies),
        "achieved_rate": achieved,
        "detail": json.dumps({"rate": rate, "seconds": seconds}),
    }
