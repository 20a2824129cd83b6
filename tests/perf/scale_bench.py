"""Scale-out, backpressure and memory (issue 8), with the four services as real processes on a
stack of their own each time, fed signed partner leads like the end-to-end bench
(tests/perf/e2e_bench.py: a lead is done when its opportunity is in reporting and notify holds
its first reminder).

- **Burst, 1 vs 3 replicas** (`scale`): capture as one process; pipeline, reporting and notify
  as 1, then (on a fresh stack) as 3 replicas each in their consumer groups. Leads are offered
  at 10x the sustained rate (`BENCH_SUSTAINED`, default 600/s: what the end-to-end bench
  sustains here; when it ran in the same `make bench`, its measured rate) for
  `BENCH_BURST_SECONDS` (default 5), with no window: the bus takes them all at once, the
  services drain it. The messages are made and signed before the clock starts, so the generator
  only sends. Measured: the rate the burst reached, the backlog held on the bus at its highest,
  the seconds until every lead was done and the rate that makes (the throughput of the system
  with that many replicas), and what "without errors" needs: every lead done, every process
  still running, no error counted in any service's /metrics (failed batches, poison messages,
  5xx), no stream_gap alarm. The row of the table is 3 replicas (ours) against 1 (baseline).
  On 2 cores the replicas share the same two cores as everything else, so the ratio says what
  the replicas' overlap of waiting (database round trips, Kafka fetches) buys, not what more
  machines would.
- **Memory at 1,000,000 events** (`memory`): one replica each, leads at `BENCH_MEMORY_RATE`
  (default 500/s, below the sustained rate, with at most WINDOW outstanding) until the services'
  event stores hold `BENCH_MEMORY_EVENTS` (default 1,000,000) events; each process's resident
  memory is read every chunk (bounded: flat, not growing with the events), its peak (VmHWM) at
  the end.

Never a timing assertion."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import httpx

from shared.devstack import DevStack
from tests.chaos.faults import SCALED
from tests.conftest import stack_settings
from tests.e2e.conftest import SERVICES, Services
from tests.perf.e2e_bench import (
    COUNT_EVERY,
    DONE_COUNT,
    POLL_SLOW,
    SAMPLE_LOAD,
    WARM_UP,
    WINDOW,
    CpuMeter,
    Leads,
    Tracker,
    drive_partners,
    infrastructure,
    latency_ms,
    launch,
    looking,
    peak_rss_mib,
)
from tests.support import metric_sum

SUSTAINED = float(os.environ.get("BENCH_SUSTAINED", "600"))  # leads/s, see the docstring
BURST_FACTOR = 10
BURST_SECONDS = float(os.environ.get("BENCH_BURST_SECONDS", "5"))
BURST_DRAIN = 600.0  # seconds the burst may take to drain
REPLICAS = (1, 3)
MEMORY_EVENTS = int(os.environ.get("BENCH_MEMORY_EVENTS", "1000000"))
MEMORY_RATE = float(os.environ.get("BENCH_MEMORY_RATE", "500"))
MEMORY_CHUNK = 30.0  # seconds of load between memory readings
STORED_EVENTS = (
    "SELECT (SELECT count(*) FROM capture.capture_events)"
    " + (SELECT count(*) FROM pipeline.pipeline_events)"
)


def errors_counted(services: Services) -> dict[str, float]:
    """`dealstream_errors_total` of each running process, from its /metrics."""
    counted = {}
    for name in services.processes:
        text = httpx.get(f"{services.url(name)}/metrics", timeout=10).text
        counted[name] = metric_sum(text, "dealstream_errors_total")
    return counted


async def started(root: Path, name: str, replicas: int) -> tuple[DevStack, Services, Leads]:
    """A fresh stack under `root / name` with the services running (`replicas` of each of
    SCALED), the partners added, and a warm-up drained through everything."""
    stack = DevStack(stack_settings(root / name))
    await asyncio.to_thread(stack.start)
    logs = stack.settings.data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    services, leads = await launch(stack, logs, dict.fromkeys(SCALED, replicas))
    db = await looking(stack)
    try:
        warm = Tracker(db, SAMPLE_LOAD, POLL_SLOW, COUNT_EVERY)
        await drive_partners(stack, leads, warm, *WARM_UP, WINDOW)
        await warm.drain()
    finally:
        await db.close()
    return stack, services, leads


async def stopped(stack: DevStack, services: Services) -> None:
    await asyncio.to_thread(services.stop)
    await asyncio.to_thread(stack.stop)


async def burst(root: Path, replicas: int, sustained: float) -> dict[str, Any]:
    stack, services, leads = await started(root, f"burst-{replicas}", replicas)
    try:
        rate = BURST_FACTOR * sustained
        leads.make_ahead(round(rate * BURST_SECONDS))
        errors_before = errors_counted(services)
        db = await looking(stack)
        try:
            tracker = Tracker(db, SAMPLE_LOAD, POLL_SLOW, COUNT_EVERY)
            roots = {name: p.pid for name, p in services.processes.items()}
            meter = CpuMeter({**roots, **infrastructure(stack)})
            meter.start()
            offered = await drive_partners(stack, leads, tracker, rate, BURST_SECONDS, 10**9)
            await tracker.drain(within=BURST_DRAIN)
            cores = meter.cores()
            gaps = await db.fetchval(
                "SELECT (SELECT count(*) FROM reporting.stream_gap)"
                " + (SELECT count(*) FROM notify.stream_gap)"
            )
        finally:
            await db.close()
        done_at = next((t for t, n in tracker.counts if n >= offered.sent), None)
        seconds = (done_at or tracker.counts[-1][0]) - offered.began
        backlog = max(
            min(offered.sent, round(offered.rate * (t - offered.began))) - n
            for t, n in tracker.counts
        )
        errors_after = errors_counted(services)
        figures = {
            "replicas": {s: len(services.replicas(s)) for s in SERVICES},
            "offered_rate": rate,
            "sent": offered.sent,
            "sent_rate": round(offered.rate),
            "sent_in_s": round(offered.seconds, 2),
            "done": tracker.counts[-1][1],
            "all_done": done_at is not None,
            "drained_in_s": round(seconds, 1),
            "drain_rate": offered.sent / seconds,
            "backlog_peak": backlog,
            "latency_to_done_sampled": latency_ms(
                [tracker.done[k] - at for k, at in tracker.sent.items() if k in tracker.done]
            ),
            "errors": {n: errors_after[n] - errors_before.get(n, 0) for n in errors_after},
            "exited": [n for n, p in services.processes.items() if p.poll() is not None],
            "stream_gaps": gaps,
            "cores_used": cores,
            "peak_rss_mib": peak_rss_mib(roots),
        }
    finally:
        await stopped(stack, services)
    print(
        f"  {replicas} replica(s): {figures['sent']} leads sent at {figures['sent_rate']}/s"
        f" ({rate:.0f}/s offered), all done: {figures['all_done']}, in"
        f" {figures['drained_in_s']} s = {figures['drain_rate']:.0f} leads/s; backlog peak"
        f" {backlog}; errors {sum(figures['errors'].values()):.0f}, exited {figures['exited']},"
        f" stream gaps {gaps}",
        flush=True,
    )
    return figures


async def bench_scale_out(root: Path, sustained: float | None = None) -> dict[str, Any]:
    """The burst with 1 replica each, then 3: the table's row (ours: 3 replicas)."""
    basis = sustained if sustained else SUSTAINED
    print(f"  a burst of {BURST_FACTOR}x {basis:.0f} leads/s for {BURST_SECONDS:.0f} s", flush=True)
    runs = {n: await burst(root, n, basis) for n in REPLICAS}
    return {
        "name": "scale-out: a 10x burst drained end to end, 3 replicas vs 1 (leads/s)",
        "ours": runs[3]["drain_rate"],
        "baseline": runs[1]["drain_rate"],
        "baseline_name": "1 replica of pipeline, reporting, notify",
        "detail": {
            "sustained_basis": basis,
            "sustained_from": "the e2e bench of this run" if sustained else "BENCH_SUSTAINED",
            "burst_seconds": BURST_SECONDS,
            "runs": {str(n): figures for n, figures in runs.items()},
        },
    }


async def bench_memory(root: Path) -> dict[str, Any]:
    """Resident memory of every process while the stores grow to MEMORY_EVENTS events."""
    stack, services, leads = await started(root, "memory", 1)
    readings: list[dict[str, Any]] = []
    began = time.perf_counter()
    try:
        roots = {name: p.pid for name, p in services.processes.items()}
        db = await looking(stack)
        try:
            stored = await db.fetchval(STORED_EVENTS)
            while stored < MEMORY_EVENTS:
                tracker = Tracker(db, 50, 2.0, 5.0, timers=False)
                offered = await drive_partners(stack, leads, tracker, MEMORY_RATE, MEMORY_CHUNK,
                                               WINDOW)  # fmt: skip
                stored = await db.fetchval(STORED_EVENTS)
                reading = {
                    "at_s": round(time.perf_counter() - began),
                    "events": stored,
                    "sent_rate": round(offered.rate),
                    "backlog": leads.made - await db.fetchval(DONE_COUNT),
                    "rss_mib": peak_rss_mib(roots, "VmRSS"),
                }
                readings.append(reading)
                print(
                    f"  {stored:>9} events, {offered.rate:.0f} leads/s, backlog"
                    f" {reading['backlog']}: "
                    + ", ".join(f"{n} {m:.0f}" for n, m in reading["rss_mib"].items()),
                    flush=True,
                )
            exited = [n for n, p in services.processes.items() if p.poll() is not None]
            peaks = peak_rss_mib(roots)
        finally:
            await db.close()
    finally:
        await stopped(stack, services)
    half = [r for r in readings if r["events"] >= stored / 2]
    return {
        "name": f"peak RSS per process with {stored:,} stored events (MiB)",
        "events": stored,
        "rate": MEMORY_RATE,
        "peak_rss_mib": peaks,
        # Bounded: what each process held in the second half of the run against the first.
        "rss_growth_second_half_mib": {
            n: round(half[-1]["rss_mib"][n] - half[0]["rss_mib"][n], 1)
            for n in half[-1]["rss_mib"]
            if half and n in half[0]["rss_mib"]
        },
        "exited": exited,
        "readings": readings,
        "seconds": round(time.perf_counter() - began),
    }
