"""Capture benchmark: signed partner messages processed per second — message in, lead (and its
registration) stored, reply out on the partner's topic — ours against a consumer that stores and
answers each message in its own transaction, each run on a fresh broker."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from aiokafka.structs import TopicPartition

from services.capture.app import MIGRATIONS, CaptureApp
from services.capture.bus import incoming, partner_intake, route
from services.capture.partners import PartnerSecrets, add_partner
from shared.bus.consumer import BatchConsumer, Record
from shared.bus.kafka import create_topics, make_producer
from shared.bus.relay_process import RelayProcess, RelaySpec
from shared.clock import SystemClock
from shared.contracts.topics import PARTNER_LEADS, partner_replies
from shared.devstack import DevStack
from shared.runtime import open_schema
from shared.settings import Settings
from tests.perf.runs import median_of, schema_of
from tests.support import lead_value, signed_headers

MESSAGES = 5000
OUT_PER_MESSAGE = 3  # LeadCaptured, PartnerRegistered, the reply


async def produce(settings: Settings, partner: str, secret: str) -> None:
    producer = make_producer(settings, linger_ms=20)
    await producer.start()
    try:
        acks = []
        for n in range(MESSAGES):
            message_id = f"{partner}-{n}"
            value = lead_value(partner, message_id, company=f"Bench Co {uuid.uuid4().hex[:10]}")
            headers = signed_headers(partner, message_id, secret, value)
            sent = await producer.send(PARTNER_LEADS, value, key=partner.encode(), headers=headers)
            acks.append(sent)
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


def naive_intake(app: CaptureApp, settings: Settings, secrets: PartnerSecrets) -> BatchConsumer:
    """The baseline: each message judged, stored and answered in its own transaction."""
    clock, rules = SystemClock(), settings.rules()

    async def handle(partition: TopicPartition, records: list[Record]) -> None:
        for record in records:
            message = incoming(record)
            known = await secrets.for_partners(
                {message.headers.get("x-partner-id", "")}, clock.now()
            )
            name = f"{PARTNER_LEADS}:{consumer.cluster}:p{partition.partition}"
            await asyncio.to_thread(app.handle_partner_messages, name, [message], known,
                                    clock.now(), rules)  # fmt: skip

    consumer = BatchConsumer("naive-intake", settings, "bench-naive", [PARTNER_LEADS], handle)
    return consumer


async def messages_per_second(stack: DevStack, label: str, run: int = 0) -> float:
    await asyncio.to_thread(stack.restart_broker)
    settings = stack.child_settings()
    schema = schema_of(f"bench_capture_{label}", run)
    pool = await open_schema(settings, schema, MIGRATIONS)
    app = await asyncio.to_thread(CaptureApp, settings.dsn(), schema, 8)
    partner = f"bench{label}"
    secret = await add_partner(pool, partner)
    await create_topics(settings, [partner_replies(partner)])
    await produce(settings, partner, secret)
    secrets = PartnerSecrets(pool)
    if label == "ours":
        consumer = partner_intake(app, settings, secrets, SystemClock())
        consumer.group_id = "bench-ours"
    else:
        consumer = naive_intake(app, settings, secrets)
    # The relay in a process of its own, as the services run it (shared.bus.relay_process).
    relay = RelayProcess(RelaySpec(f"bench-{label}", CaptureApp, schema, route), settings, app)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(relay.run(stop))]
    while not relay.leading:  # the relay's process up and attached before the clock starts
        await asyncio.sleep(0.005)
    tasks.append(asyncio.create_task(consumer.run(stop)))
    while not consumer.running:
        await asyncio.sleep(0.005)
    started = time.perf_counter()
    while relay.published < MESSAGES * OUT_PER_MESSAGE:
        await asyncio.sleep(0.01)
    seconds = time.perf_counter() - started
    stop.set()
    await asyncio.gather(*tasks)
    app.close()
    await pool.close()
    print(f"  {label}: {MESSAGES} messages, {MESSAGES / seconds:.0f}/s", flush=True)
    return MESSAGES / seconds


async def bench_partner_intake(stack: DevStack) -> dict[str, Any]:
    naive = await messages_per_second(stack, "naive")
    return {
        "name": "capture: signed partner messages -> lead stored, reply out (messages/s)",
        **await median_of(lambda run: messages_per_second(stack, "ours", run)),
        "baseline": naive,
        "baseline_name": "a transaction per message",
    }
