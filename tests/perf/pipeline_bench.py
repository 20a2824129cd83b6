"""Pipeline benchmarks: opportunities opened from `lead.events.v1` into the store and out on
`opportunity.events.v1` (ours vs a consumer that saves each lead in its own transaction), and
the latency from a stage-change command over HTTP to the pipeline process until its event is on
Kafka, at a fixed command rate."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer

from services.pipeline.app import MIGRATIONS, SCHEMA, PipelineApp
from services.pipeline.bus import lead_events, route
from shared.auth import Principal, Role, issue_token
from shared.bus.consumer import Batch, BatchConsumer
from shared.bus.envelopes import decode_records
from shared.bus.kafka import make_producer
from shared.bus.relay_process import RelayProcess, RelaySpec
from shared.contracts.envelope import HEADER_EVENT_TYPE, HEADER_NOTIFICATION_ID
from shared.contracts.topics import LEAD_EVENTS, OPPORTUNITY_EVENTS
from shared.devstack import DevStack, free_port
from shared.runtime import open_schema
from shared.settings import Settings
from tests.factories import lead_captured
from tests.perf.runs import median_of, schema_of
from tests.support import terminate

OPEN_N = int(os.environ.get("BENCH_OPEN_N", "5000"))
READER_FETCH_WAIT_MS = 10
CLIENTS, CONNECTIONS = 16, 2  # callers of the API, each an httpx client with its own pool


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

    async def handle(batch: Batch) -> None:
        for partition, records in batch.items():
            for item in decode_records(records):
                await asyncio.to_thread(
                    app.apply_lead_events, f"capture:p{partition.partition}", [item], rules
                )

    return BatchConsumer("naive", settings, group, [LEAD_EVENTS], handle)


async def opened_per_second(settings: Settings, label: str, first_id: int, run: int = 0) -> float:
    schema = schema_of(f"bench_open_{label}", run)
    pool = await open_schema(settings, schema, MIGRATIONS)
    app = await asyncio.to_thread(PipelineApp, settings.dsn(), schema, 8)
    if label == "ours":
        consumer = lead_events(app, settings)
        consumer.group_id = f"bench-{label}"
    else:
        consumer = naive_consumer(app, settings, f"bench-{label}")
    # The relay in a process of its own, as the services run it (shared.bus.relay_process).
    relay = RelayProcess(RelaySpec(f"bench-{label}", PipelineApp, schema, route), settings, app)
    # The leads wait on the topic (as capture's relay left them); the clock runs from the
    # consumer's partition assignment until the last opportunity event is acked by the broker.
    await produce_leads(settings, OPEN_N, first_id)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(relay.run(stop))]
    while not relay.leading:  # the relay's process up and attached before the clock starts
        await asyncio.sleep(0.005)
    tasks.append(asyncio.create_task(consumer.run(stop)))
    while not consumer.running:
        await asyncio.sleep(0.005)
    started = time.perf_counter()
    want = OPEN_N * 3  # opened, scored, assigned
    while relay.published < want:
        await asyncio.sleep(0.01)
    seconds = time.perf_counter() - started
    print(f"  {label}: {OPEN_N} leads in {consumer.batches} partition batches,"
          f" {OPEN_N / seconds:.0f}/s", flush=True)  # fmt: skip
    stop.set()
    await asyncio.gather(*tasks)
    app.close()
    await pool.close()
    return OPEN_N / seconds


async def bench_opening(stack: DevStack) -> dict[str, Any]:
    # Each run gets a fresh, empty broker, so every run reads exactly its own OPEN_N leads.
    await asyncio.to_thread(stack.restart_broker)
    naive = await opened_per_second(stack.child_settings(), "naive", 1)

    async def ours(run: int) -> float:
        await asyncio.to_thread(stack.restart_broker)
        return await opened_per_second(stack.child_settings(), "ours", 1, run)

    return {
        "name": "pipeline: leads in -> opportunities stored and on Kafka (opportunities/s)",
        **await median_of(ours),
        "baseline": naive,
        "baseline_name": "a transaction per lead",
    }


def service_env(settings: Settings, port: int) -> dict[str, str]:
    """The environment of a pipeline process on the same stack as `settings`."""
    env = {
        **os.environ,
        "DEALSTREAM_KAFKA": settings.bootstrap_servers(),
        "DEALSTREAM_DATABASE_URL": settings.dsn(),
        "DEALSTREAM_KAFKA_IDEMPOTENCE": str(settings.idempotent_producer()).lower(),
        "DEALSTREAM_DATA_DIR": str(settings.data_dir),
        "DEALSTREAM_CONFIG_FILE": str(settings.config_file),
        "DEALSTREAM_TOKEN_SECRET": settings.secret_for_tokens(),
        "DEALSTREAM_PIPELINE_PORT": str(port),
        "DEALSTREAM_CONSUMER_SESSION_TIMEOUT_MS": str(settings.consumer_session_timeout_ms),
    }
    return env


async def wait_caught_up(http: httpx.AsyncClient, service: subprocess.Popen[bytes],
                         log_path: Path, within: float = 120.0) -> None:  # fmt: skip
    """Until the service answers ready with nothing left to publish."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise RuntimeError(f"pipeline exited with {service.returncode}; see {log_path}")
        with contextlib.suppress(httpx.HTTPError):
            answer = await http.get("/readyz", timeout=5)
            if answer.status_code == 200 and answer.json()["checks"].get("relay_lag") == 0:
                return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"pipeline not ready and caught up within {within}s; see {log_path}")


def percentile(ordered: list[float], fraction: float) -> float:
    return ordered[max(0, math.ceil(len(ordered) * fraction) - 1)]


async def bench_command_latency(
    settings: Settings, rate: float = 200.0, seconds: float = 10.0
) -> dict[str, Any]:
    """Stage-change commands at a fixed `rate`/s (open loop: each sent on its schedule, whatever
    the answers before it) over real HTTP to the pipeline service running as its own process
    (uvicorn, relay, consumers: `python -m services.pipeline`); latency from each command's
    scheduled send time until its event is read back from `opportunity.events.v1` by a plain
    aiokafka consumer in this process. The broker should be empty of lead events (the service's
    consumer would otherwise open them meanwhile)."""
    count = int(rate * seconds)
    pool = await open_schema(settings, SCHEMA, MIGRATIONS)
    app = await asyncio.to_thread(PipelineApp, settings.dsn(), SCHEMA, 2)
    leads = [lead_captured(uuid.uuid4()) for _ in range(count)]
    items = list(enumerate(leads, start=1))
    for start in range(0, count, 500):
        await asyncio.to_thread(app.apply_lead_events, "bench:p0", items[start : start + 500],
                                settings.rules())  # fmt: skip
    app.close()
    rows = await pool.fetch(
        "SELECT i.opportunity_id, i.version FROM opportunity_lead l"
        " JOIN opportunity_index i USING (opportunity_id) WHERE l.lead_id = ANY($1::uuid[])",
        [lead.stream_id for lead in leads],
    )
    await pool.close()
    targets = [(str(row["opportunity_id"]), int(row["version"])) for row in rows]

    port = free_port()
    log_path = settings.data_dir / "bench-pipeline.log"
    with log_path.open("ab") as log:
        service = subprocess.Popen(
            [sys.executable, "-m", "services.pipeline"],
            env=service_env(settings, port),
            stdout=log,
            stderr=log,
        )
    token = issue_token(Principal(role=Role.admin, user="bench"), settings.secret_for_tokens(),
                        datetime.now(UTC), timedelta(hours=1))  # fmt: skip
    # Several callers with small pools rather than one large pool: httpcore checks every pooled
    # connection's socket on every request and scans its queue, so one pool of 32 (or of 8)
    # cost the client 2.5-3.5 ms of CPU a request and, once a queue formed, the client fell
    # behind its own schedule for good while the service sat idle (py-spy during the stall).
    clients = [
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {token}"},
            limits=httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS),
            timeout=httpx.Timeout(30.0),
        )
        for _ in range(CLIENTS)
    ]
    http = clients[0]
    # Tansu answers a fetch that finds nothing new only after fetch_max_wait_ms (it does not wake
    # it when records arrive), so a reader on the default 500 ms adds up to 500 ms of its own.
    consumer = AIOKafkaConsumer(OPPORTUNITY_EVENTS, bootstrap_servers=settings.bootstrap_servers(),
                                auto_offset_reset="latest", group_id=None,
                                fetch_max_wait_ms=READER_FETCH_WAIT_MS)  # fmt: skip
    scheduled: dict[str, float] = {}
    latencies: list[float] = []
    answered: list[float] = []
    statuses: list[int] = []
    started: list[float] = []
    try:
        await wait_caught_up(http, service, log_path)  # the opened opportunities are out
        await consumer.start()
        await consumer.seek_to_end()
        for partition in consumer.assignment():
            await consumer.position(partition)  # the end is fixed before the first command

        async def listen() -> None:
            while len(latencies) < count:
                for records in (await consumer.getmany(timeout_ms=100)).values():
                    now = time.perf_counter()
                    for record in records:
                        event_type = dict(record.headers).get(HEADER_EVENT_TYPE)
                        key = record.key.decode() if record.key else ""
                        if event_type == b"OpportunityStageChanged" and key in scheduled:
                            latencies.append(now - scheduled.pop(key))

        async def command(client: httpx.AsyncClient, opportunity: str, version: int,
                          at: float) -> None:  # fmt: skip
            started.append(time.perf_counter())
            body = {"expected_version": version, "to_stage": "B"}
            try:
                answer = await client.post(f"/v1/opportunities/{opportunity}/stage", json=body)
                statuses.append(answer.status_code)
            except httpx.HTTPError:
                statuses.append(0)
            answered.append(time.perf_counter() - at)

        listener = asyncio.create_task(listen())
        interval = 1.0 / rate
        began = time.perf_counter()
        pending = []
        for n, (opportunity, version) in enumerate(targets):
            at = began + n * interval
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            scheduled[opportunity] = at
            client = clients[n % CLIENTS]
            pending.append(asyncio.create_task(command(client, opportunity, version, at)))
        await asyncio.gather(*pending)
        span = max(started) - min(started)
        achieved = (len(started) - 1) / span if span > 0 else float(len(started))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(listener, 30)
    finally:
        await consumer.stop()
        for client in clients:
            await client.aclose()
        await terminate(service, 20)
    ordered = sorted(latencies) or [math.nan]
    http_ordered = sorted(answered) or [math.nan]
    return {
        "name": f"stage command -> event on Kafka at {rate:.0f}/s (ms)",
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * percentile(ordered, 0.99),
        "commands": count,
        "accepted": sum(1 for status in statuses if status == 200),
        "received": len(latencies),
        "achieved_rate": achieved,
        "detail": json.dumps(
            {
                "rate": rate,
                "seconds": seconds,
                "service": "python -m services.pipeline (own process, uvicorn)",
                "reader_fetch_max_wait_ms": READER_FETCH_WAIT_MS,
                "clients": f"{CLIENTS} httpx clients x {CONNECTIONS} connections",
                "http_p50_ms": round(1000 * statistics.median(http_ordered), 1),
                "http_p99_ms": round(1000 * percentile(http_ordered, 0.99), 1),
                "max_ms": round(1000 * ordered[-1], 1),
            }
        ),
    }
