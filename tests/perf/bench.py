"""Foundation benchmarks (`make bench`): each mechanism measured side by side with its naive
baseline or the raw rate in the same run, on the same embedded PostgreSQL and broker. Prints a
table and writes bench-results.json. Never a timing assertion."""

from __future__ import annotations

import asyncio
import json
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from services.pipeline.app import MIGRATIONS as PIPELINE_MIGRATIONS
from services.pipeline.app import PipelineApp
from services.pipeline.bus import route as pipeline_route
from services.reporting.projection import MIGRATIONS as REPORTING_MIGRATIONS
from services.reporting.projection import project
from shared.bus.consumer import apply_read_model
from shared.bus.kafka import make_admin, make_producer
from shared.bus.relay import OutboxRelay
from shared.contracts.envelope import Envelope
from shared.contracts.topics import OPPORTUNITY_EVENTS
from shared.devstack import DevStack, free_port
from shared.gctune import tune_gc
from shared.runtime import open_schema
from shared.settings import Rules, Settings
from tests.factories import lead_captured, opened
from tests.perf.capture_bench import bench_partner_intake
from tests.perf.e2e_bench import bench_end_to_end_own_stack
from tests.perf.notify_bench import bench_reminders
from tests.perf.operations_bench import bench_operations
from tests.perf.pipeline_bench import bench_command_latency, bench_opening
from tests.perf.reporting_bench import bench_report_latency, bench_reporting_consumer
from tests.perf.runs import remove_databases
from tests.perf.scale_bench import bench_memory, bench_scale_out

N = 5000
BATCH = 500
NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def lead_envelope(n: int) -> tuple[int, Envelope]:
    return n, lead_captured(uuid.uuid4())


def opened_envelope() -> Envelope:
    return opened(uuid.uuid4(), "1000.00")


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


async def timed(work: Callable[[], Any]) -> float:
    started = time.perf_counter()
    await work()
    return time.perf_counter() - started


async def bench_tracked_consumer(settings: Settings) -> dict[str, Any]:
    """Opening opportunities from lead events with tracking: a batch per transaction (ours) vs a
    transaction per event (naive)."""
    results = {}
    for label, size in (("batched", BATCH), ("naive", 1)):
        schema = f"bench_tc_{label}"
        pool = await open_schema(settings, schema, PIPELINE_MIGRATIONS)
        await pool.close()
        app = await asyncio.to_thread(PipelineApp, settings.dsn(), schema)
        items = [lead_envelope(n) for n in range(1, N + 1)]

        async def run(app: PipelineApp = app, items: list[Any] = items, size: int = size) -> None:
            for chunk in chunks(items, size):
                await asyncio.to_thread(app.apply_lead_events, "capture:p0", chunk, Rules())

        seconds = await timed(run)
        results[label] = N / seconds
        app.close()
    return {
        "name": "tracked consumer: lead events -> opportunities (events/s)",
        "ours": results["batched"],
        "baseline": results["naive"],
        "baseline_name": "one transaction per event",
    }


async def bench_read_model(settings: Settings) -> dict[str, Any]:
    """Read-model rows with stream-version tracking: a batch per transaction vs one per event."""
    results = {}
    for label, size in (("batched", BATCH), ("naive", 1)):
        pool = await open_schema(settings, f"bench_rm_{label}", REPORTING_MIGRATIONS)
        envelopes = [opened_envelope() for _ in range(N)]

        async def run(
            pool: Any = pool, envelopes: list[Envelope] = envelopes, size: int = size
        ) -> None:
            for chunk in chunks(envelopes, size):
                await apply_read_model(pool, chunk, project)

        results[label] = N / await timed(run)
        await pool.close()
    return {
        "name": "read-model consumer: opportunity events -> funnel rows (events/s)",
        "ours": results["batched"],
        "baseline": results["naive"],
        "baseline_name": "one transaction per event",
    }


async def bench_relay(settings: Settings) -> dict[str, Any]:
    """The outbox relay (read the notification log, build envelopes, publish, record the
    position) vs the raw aiokafka produce rate of the same bytes."""
    schema = "bench_relay"
    pool = await open_schema(settings, schema, PIPELINE_MIGRATIONS)
    app = await asyncio.to_thread(PipelineApp, settings.dsn(), schema)
    items = [lead_envelope(n) for n in range(1, N + 1)]
    for chunk in chunks(items, BATCH):
        await asyncio.to_thread(app.apply_lead_events, "capture:p0", chunk, Rules())
    relay = OutboxRelay("bench", app, pipeline_route, settings, pool)
    producer = make_producer(settings)
    admin = make_admin(settings)
    await producer.start()
    await admin.start()

    stored = 3 * N  # opened, scored, assigned
    # Steady state on both sides: the relay attached (topics made, cluster known), the
    # producer's metadata fresh, before either clock starts.
    await relay.attach(admin)
    await producer.partitions_for(OPPORTUNITY_EVENTS)

    async def relay_all() -> None:
        while relay.position < stored:
            await relay.publish_batch(producer, admin)

    relay_seconds = await timed(relay_all)
    notifications = await asyncio.to_thread(app.notifications_after, 0, stored)
    messages = relay._route_all(notifications)

    async def raw() -> None:
        acks = [
            await producer.send(m.topic, m.value, key=m.key, headers=list(m.headers))
            for _, m in messages
        ]
        await asyncio.gather(*acks)

    raw_seconds = await timed(raw)
    await producer.stop()
    await admin.close()
    await pool.close()
    app.close()
    return {
        "name": "outbox relay: stored events -> Kafka (events/s)",
        "ours": stored / relay_seconds,
        "baseline": stored / raw_seconds,
        "baseline_name": "raw aiokafka produce of the same messages",
    }


def sustained(rows: list[dict[str, Any]]) -> float | None:
    """The end-to-end rate measured earlier in this run, if the e2e bench ran."""
    return next((r["ours"] for r in rows if r["name"].startswith("end to end")), None)


async def main() -> int:
    data_dir = Path(tempfile.mkdtemp(prefix="dealstream-bench-"))
    stack = DevStack(Settings(data_dir=data_dir, kafka_port=free_port()))
    await asyncio.to_thread(stack.start)
    settings = stack.child_settings()
    # `python -m tests.perf.bench notify relay` runs only the benchmarks named so.
    chosen = sys.argv[1:]
    benches: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
        "consumer": lambda: bench_tracked_consumer(settings),
        "read-model": lambda: bench_read_model(settings),
        "relay": lambda: bench_relay(settings),
        "pipeline": lambda: bench_opening(stack),
        "capture": lambda: bench_partner_intake(stack),
        "notify": lambda: bench_reminders(stack.child_settings()),
        "reporting": lambda: bench_reporting_consumer(stack),
        # The four services as processes on a stack of their own, against a CRUD service.
        "e2e": lambda: bench_end_to_end_own_stack(data_dir),
        # 1 vs 3 replicas draining a burst 10x the sustained rate (the e2e rate, if it ran).
        "scale": lambda: bench_scale_out(data_dir, sustained(rows)),
    }
    rows: list[dict[str, Any]] = []
    memory: dict[str, Any] | None = None
    latency: dict[str, Any] | None = None
    reports: dict[str, Any] | None = None
    audit: dict[str, Any] | None = None
    finished = False
    try:
        for name, bench in benches.items():
            if not chosen or name in chosen:
                print(f"{name} ...", flush=True)
                rows.append(await bench())
        if not chosen or "latency" in chosen:
            await asyncio.to_thread(stack.restart_broker)  # no lead events for pipeline to open
            latency = await bench_command_latency(stack.child_settings())
        if not chosen or "reports" in chosen:
            reports = await bench_report_latency(stack.child_settings())
        if not chosen or "operations" in chosen:
            print("operations ...", flush=True)
            operations = await bench_operations(stack.child_settings())
            rows.append(operations["replay"])
            audit = operations["audit"]
        if not chosen or "memory" in chosen:
            print("memory ...", flush=True)
            memory = await bench_memory(data_dir)
        finished = True
    finally:
        await asyncio.to_thread(stack.stop)
        # A run's databases take gigabytes: gone after it, kept after a failure; the logs stay.
        if finished:
            await asyncio.to_thread(remove_databases, data_dir)
        print(f"logs{'' if finished else ' and databases'} in {data_dir}", file=sys.stderr)
    for row in rows:
        row["ratio"] = row["ours"] / row["baseline"]
    width = max((len(r["name"]) for r in rows), default=10)
    print(f"\n{'benchmark':<{width}}  {'ours':>9}  {'baseline':>9}  {'ratio':>6}  baseline is")
    for r in rows:
        numbers = f"{r['ours']:>9.0f}  {r['baseline']:>9.0f}  {r['ratio']:>5.2f}x"
        print(f"{r['name']:<{width}}  {numbers}  {r['baseline_name']}")
    report = json.dumps(
        {
            "measured_at": datetime.now(UTC).isoformat(),
            "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
            "events_per_run": N,
            "batch": BATCH,
            "results": rows,
            "latency": latency,
            "reports": reports,
            "audit": audit,
            "memory": memory,
        },
        indent=2,
    )
    await asyncio.to_thread(Path("bench-results.json").write_text, report)
    if latency is not None:
        print(
            f"\n{latency['name']}: p50 {latency['p50_ms']:.1f} ms, p99 {latency['p99_ms']:.1f} ms"
            f" ({latency['received']}/{latency['commands']} events seen,"
            f" {latency['accepted']} accepted, {latency['achieved_rate']:.0f} commands/s sent)"
        )
    if reports is not None:
        print(f"\n{reports['name']}:")
        for route, ms in reports["p95_ms"].items():
            print(f"  {route:<22} {ms:7.1f}")
    if audit is not None:
        print(f"\n{audit['name']}: {audit['seconds']:.1f} s ({audit['lost_deals']} lost deals)")
    if memory is not None:
        print(f"\n{memory['name']}, {memory['rate']:.0f} leads/s offered; growth over the second"
              " half of the run in brackets:")  # fmt: skip
        for name, mib in memory["peak_rss_mib"].items():
            print(f"  {name:<22} {mib:7.1f}  ({memory['rss_growth_second_half_mib'].get(name)})")
    print("\nwrote bench-results.json")
    return 0


if __name__ == "__main__":
    # The consumers measured run in this process, as in a service's: the same collector tuning
    # (the baselines run here too, tuned alike).
    tune_gc()
    sys.exit(asyncio.run(main()))
