"""Capture benchmark: signed partner messages processed per second — message in, lead (and its
registration) stored, reply out on the partner's topic — ours against a consumer that stores and
answers each message in its own transaction, each run on a fresh broker and schema.

Both run as capture is deployed (SPEC: every service runs as N replicas in one consumer group;
docs/handbook/scaling.md: at least 2 for capture): `REPLICAS` processes of the intake in one
consumer group, fed by `PARTNERS` partners, one on each partition of `partner.leads.v1` (a
partner's messages keep their order on one partition, so one partner is one replica's work). The
relay runs in a process of its own, as the services run it. Ours with one replica and one
partner is measured in the same run for comparison."""

from __future__ import annotations

import asyncio
import multiprocessing
import time
import uuid
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from typing import Any

from services.capture.app import MIGRATIONS, CaptureApp
from services.capture.bus import incoming, partner_intake, route
from services.capture.partners import PartnerSecrets, add_partner
from shared.bus.consumer import Batch, BatchConsumer
from shared.bus.kafka import create_topics, partition_for
from shared.bus.relay_process import RelayProcess, RelaySpec
from shared.clock import SystemClock
from shared.contracts.topics import PARTNER_LEADS, partner_replies
from shared.devstack import DevStack
from shared.gctune import tune_gc
from shared.runtime import open_schema
from shared.settings import Settings
from shared.store.db import create_pool
from tests.perf.runs import median_of, schema_of
from tests.support import lead_value, send_partner_messages, signed_headers

MESSAGES = 20000
OUT_PER_MESSAGE = 3  # LeadCaptured, PartnerRegistered, the reply
REPLICAS = 2
PARTNERS = 6


def bench_partners(count: int, settings: Settings) -> list[str]:
    """`count` partner ids whose keys land on different partitions (while there are any left)."""
    partitions = list(range(settings.topic_partitions))
    chosen: list[str] = []
    taken: set[int] = set()
    n = 0
    while len(chosen) < count:
        name, n = f"bench{n}", n + 1
        partition = partition_for(name.encode(), partitions, partitions)
        if partition not in taken or len(taken) == len(partitions):
            taken.add(partition)
            chosen.append(name)
    return chosen


def signed_messages(secrets: dict[str, str]) -> list[tuple[str, bytes, list[Any]]]:
    """`MESSAGES` signed partner messages (partner, value, headers), the partners taking turns."""
    partners, messages = list(secrets), []
    for n in range(MESSAGES):
        partner = partners[n % len(partners)]
        message_id = f"{partner}-{n}"
        value = lead_value(partner, message_id, company=f"Bench Co {uuid.uuid4().hex[:10]}")
        headers = signed_headers(partner, message_id, secrets[partner], value)
        messages.append((partner, value, headers))
    return messages


def naive_intake(app: CaptureApp, settings: Settings, secrets: PartnerSecrets) -> BatchConsumer:
    """The baseline: each message judged, stored and answered in its own transaction."""
    clock, rules = SystemClock(), settings.rules()

    async def handle(batch: Batch) -> None:
        for partition, records in batch.items():
            for record in records:
                message = incoming(record)
                known = await secrets.current(clock.now())
                name = f"{PARTNER_LEADS}:{consumer.cluster}:p{partition.partition}"
                await asyncio.to_thread(app.handle_partner_messages, name, [message], known,
                                        clock.now(), rules)  # fmt: skip

    consumer = BatchConsumer("naive-intake", settings, "bench-naive", [PARTNER_LEADS], handle)
    return consumer


def replica(
    settings: Settings,
    schema: str,
    label: str,
    assigned: Synchronized[int],
    go: Event,
    stop: Event,
) -> None:
    """One replica of the intake (ours or the naive one) in a process of its own, handling
    nothing before `go` and running until `stop`; `assigned`: how many partitions the group gave
    it."""

    async def run() -> None:
        pool = await create_pool(settings.dsn(), schema)
        app = await asyncio.to_thread(CaptureApp, settings.dsn(), schema, 8)
        secrets = PartnerSecrets(pool)
        if label == "ours":
            consumer = partner_intake(app, settings, secrets, SystemClock())
            consumer.group_id = "bench-ours"
        else:
            consumer = naive_intake(app, settings, secrets)
        handle, started = consumer.handle, asyncio.Event()

        async def gated(batch: Batch) -> None:
            await started.wait()
            await handle(batch)

        consumer.handle = gated
        done = asyncio.Event()
        task = asyncio.create_task(consumer.run(done))
        while not stop.is_set() and not task.done():
            assigned.value = consumer.assigned
            if go.is_set():
                started.set()
            await asyncio.sleep(0.002)
        done.set()
        await task
        app.close()
        await pool.close()

    tune_gc()  # as a service's process is (shared.runtime.run_service)
    asyncio.run(run())


async def messages_per_second(
    stack: DevStack, label: str, run: int = 0, replicas: int = REPLICAS, partners: int = PARTNERS
) -> float:
    await asyncio.to_thread(stack.restart_broker)
    settings = stack.child_settings()
    schema = schema_of(f"bench_capture_{label}_{replicas}", run)
    pool = await open_schema(settings, schema, MIGRATIONS)
    app = await asyncio.to_thread(CaptureApp, settings.dsn(), schema, 8)
    secrets = {p: await add_partner(pool, p) for p in bench_partners(partners, settings)}
    await create_topics(settings, [partner_replies(p) for p in secrets])
    await send_partner_messages(settings.bootstrap_servers(), signed_messages(secrets))
    relay = RelayProcess(RelaySpec(f"bench-{label}", CaptureApp, schema, route), settings, app)
    stop = asyncio.Event()
    relaying = asyncio.create_task(relay.run(stop))
    while not relay.leading:  # the relay's process up and attached before the clock starts
        await asyncio.sleep(0.005)
    context = multiprocessing.get_context("spawn")
    going, stopping = context.Event(), context.Event()
    assigned = [context.Value("i", 0, lock=False) for _ in range(replicas)]
    processes = [
        context.Process(target=replica, args=(settings, schema, label, share, going, stopping))
        for share in assigned
    ]
    for process in processes:
        process.start()
    # The messages wait on their partitions; the replicas handle nothing until their group has
    # formed (every partition taken, each replica holding some): the throughput of the replicas
    # together, not of the first to join alone until the rebalance the others bring (a
    # heartbeat or more later). A batch the first one fetched before that is handled all the
    # same when the clock starts, by it and by its partitions' new owners (one of them stores
    # it, the other's work is lost): counted in.
    while sum(a.value for a in assigned) < settings.topic_partitions or not all(
        a.value for a in assigned
    ):
        _alive(processes, label)
        await asyncio.sleep(0.005)
    # Each run from the same state of the database: no checkpoint of an earlier run's writes
    # under way (and no earlier run's tables left to vacuum: each is dropped once checked).
    await pool.execute("CHECKPOINT")
    going.set()
    started = time.perf_counter()
    while relay.published < MESSAGES * OUT_PER_MESSAGE:
        _alive(processes, label)
        await asyncio.sleep(0.01)
    seconds = time.perf_counter() - started
    stopping.set()
    await asyncio.to_thread(lambda: [p.join() for p in processes])
    stop.set()
    await relaying
    # Every message stored and answered exactly once: its lead, its registration, its answer.
    stored = await pool.fetchval("SELECT count(*) FROM capture_events")
    app.close()
    if stored != MESSAGES * OUT_PER_MESSAGE:
        await pool.close()
        raise RuntimeError(f"{label}: {stored} events stored for {MESSAGES} messages")
    await pool.execute(f'DROP SCHEMA "{schema}" CASCADE')  # checked: its rows are not needed
    await pool.close()
    rate = MESSAGES / seconds
    print(f"  {label}, {replicas} replica(s), {partners} partner(s): {MESSAGES} messages,"
          f" {rate:.0f}/s", flush=True)  # fmt: skip
    return rate


def _alive(processes: list[Any], label: str) -> None:
    if not all(p.is_alive() for p in processes):
        raise RuntimeError(f"a replica of the {label} intake died (its error is above)")


async def bench_partner_intake(stack: DevStack) -> dict[str, Any]:
    naive = await messages_per_second(stack, "naive")
    one = await messages_per_second(stack, "ours", replicas=1, partners=1)
    return {
        "name": (
            f"capture: signed partner messages -> lead stored, reply out (messages/s;"
            f" {REPLICAS} replicas, {PARTNERS} partners)"
        ),
        **await median_of(lambda run: messages_per_second(stack, "ours", run)),
        "baseline": naive,
        "baseline_name": "a transaction per message",
        "replicas": REPLICAS,
        "partners": PARTNERS,
        "ours_one_replica_one_partner": one,
    }
