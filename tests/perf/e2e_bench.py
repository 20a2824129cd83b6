"""End-to-end benchmark (issue 8): the whole system as it runs in production — the four services as
real processes (`python -m services.<name>`) on one PostgreSQL and one broker — fed signed
partner messages on `partner.leads.v1` by an open-loop load generator, against a CRUD baseline
(tests/perf/crud_baseline.py: one FastAPI + asyncpg process that stores the lead, its opportunity
and a stage-history row in one transaction per request) driven by the same generator over HTTP
(through tests/perf/http_load.py, a client about as cheap as the partners' Kafka producer), for the
same number of seconds, on the same PostgreSQL, in the same run.

What is measured:
- **Sustained throughput** (`BENCH_E2E_SECONDS`, default 60): leads offered at `BENCH_E2E_RATE`/s
  (open loop: each on its schedule, whatever happened to the ones before it) with at most
  `BENCH_E2E_WINDOW` outstanding, so the backlog cannot grow without bound: when the window is
  full the schedule waits, and the rate measured is what the system completes with that backlog.
  A lead is done when its opportunity is in `reporting.opportunity_now` and notify holds its
  first reminder (the `follow_up` timer); the rate counts completions per second over the window
  minus its first `WARM` seconds. The backlog at the end (leads sent, not done) and the age of the
  oldest of them say how far behind the system was. The CRUD baseline is driven the same way, a
  request done when its 201 is read, its window the callers' connections.
  Leads done are counted over the whole stack (its own, fresh) twice a second; every tenth lead
  is also followed on its own, for the oldest still open at the end.
- **Latency, partner message -> funnel count**: leads at 500/s, open loop (or 80 % of the
  sustained rate if that is below 500; the detail says which) for `BENCH_E2E_LATENCY_SECONDS`
  (default 20), from each message's scheduled send time until its opportunity is seen in
  `reporting.opportunity_now`; every fifth lead is followed, looked up in batches every POLL_FAST
  s, so each figure is high by up to one look.
- **Stage change**: STAGE_COMMANDS `POST /v1/opportunities/{id}/stage` commands at STAGE_RATE/s
  over HTTP to pipeline, latency until the event is read from `opportunity.events.v1` by a plain
  consumer and until `reporting.opportunity_now` shows the new stage.

Everything (broker, PostgreSQL, four services, the baseline, the generator) shares the machine;
the cores each used during the windows are in the detail, with what every other process on the
machine took meanwhile (on a shared machine it moves either figure a lot). Never a timing
assertion."""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from services.capture.domain import partner_lead_id
from services.pipeline.domain import opportunity_id_for
from shared.auth import Principal, Role, issue_token
from shared.contracts.envelope import HEADER_EVENT_TYPE
from shared.contracts.topics import OPPORTUNITY_EVENTS, PARTNER_LEADS
from shared.devstack import DevStack, free_port
from tests.conftest import stack_settings
from tests.e2e.conftest import Services, cli, partner_secret
from tests.perf.http_load import HttpLoadError, LoadClient
from tests.perf.pipeline_bench import percentile
from tests.support import lead_value, signed_headers, terminate

SECONDS = float(os.environ.get("BENCH_E2E_SECONDS", "60"))
# Leads/s offered to each side: more than either takes on 2 cores (the window fills), so each
# side's rate is what it sustains, not what it was offered.
RATE = float(os.environ.get("BENCH_E2E_RATE", "2000"))
WINDOW = int(os.environ.get("BENCH_E2E_WINDOW", "4000"))  # leads outstanding at most
LATENCY_RATE = 500.0
LATENCY_SECONDS = float(os.environ.get("BENCH_E2E_LATENCY_SECONDS", "20"))
STAGE_COMMANDS, STAGE_RATE = 200, 20.0
WARM = 5.0  # seconds at the start of a window left out of its rate
WARM_UP = (200.0, 3.0)  # leads/s and seconds through everything before anything is measured
TICK = 0.005  # the generator's longest sleep
POLL_FAST, POLL_SLOW = 0.05, 0.2  # seconds between looks at the database (latency, throughput)
POLL_CAP = 2_000  # sampled leads looked up at once, oldest first
COUNT_EVERY = 0.5  # seconds between counts of the leads done
SAMPLE_LOAD, SAMPLE_LATENCY = 10, 5  # every n-th lead followed on its own
DRAIN = 60.0  # seconds to wait for the backlog after a window
# Three partners whose keys land on three partitions of partner.leads.v1 (key = partner id).
PARTNERS = ("acme", "globex", "stark")
# The CRUD baseline's callers: keep-alive connections, one request in flight on each (the
# window), through a lean client (tests/perf/http_load.py: httpx's CPU held the baseline down).
CRUD_CONNECTIONS = 32
JSON = {"content-type": "application/json"}
REPORTED = "SELECT opportunity_id FROM reporting.opportunity_now WHERE opportunity_id = ANY($1)"
TIMED = (
    "SELECT opportunity_id FROM notify.timer WHERE kind = 'follow_up' AND opportunity_id = ANY($1)"
)
DONE_COUNT = (
    "SELECT count(*) FROM reporting.opportunity_now o JOIN notify.timer t"
    " ON t.opportunity_id = o.opportunity_id AND t.kind = 'follow_up'"
)


async def looking(stack: DevStack) -> asyncpg.Connection:
    """The bench's own connection for its looks at the stack, planned for each look's ids: a
    plan kept from the first looks, at a table still small, reads the whole table at every look
    until autovacuum analyzes it (the first minute or more of a fresh stack), and takes the
    database's time from the system measured (6.1 s in a 40 s window, 0.2 s planned so)."""
    return await asyncpg.connect(
        stack.database_url, server_settings={"plan_cache_mode": "force_custom_plan"}
    )


@dataclass
class Lead:
    partner_id: str
    value: bytes
    headers: list[tuple[str, bytes]]
    opportunity_id: uuid.UUID


class Leads:
    """Signed partner messages, a different customer each, round robin over the partners."""

    def __init__(self, secrets: dict[str, str]) -> None:
        self.secrets = secrets
        self.partners = itertools.cycle(sorted(secrets))
        self.made = 0
        self._ahead: collections.deque[Lead] = collections.deque()

    def make_ahead(self, n: int) -> None:
        """Make and sign the next `n` leads now, so sending them later costs only the send."""
        self._ahead.extend(self._make() for _ in range(n))

    def next(self) -> Lead:
        return self._ahead.popleft() if self._ahead else self._make()

    def _make(self) -> Lead:
        partner_id = next(self.partners)
        self.made += 1
        n, tag = self.made, uuid.uuid4().hex[:8]
        message_id = f"{partner_id}-{n:09d}-{tag}"
        # A customer nobody sent before (company, e-mail and phone unique by the counter): a
        # random phone would match an earlier lead now and then and be merged into it (no new
        # opportunity, nothing for the bench to wait for).
        contact = {"name": "Li Wei", "email": f"li.wei.{n}.{tag}@example.cn",
                   "phone": f"+86 139 {n % 10**8:08d}"}  # fmt: skip
        value = lead_value(partner_id, message_id, company=f"Northwind {n} {tag}", contact=contact)
        headers = signed_headers(partner_id, message_id, self.secrets[partner_id], value)
        lead_id = partner_lead_id(partner_id, message_id)
        return Lead(partner_id, value, headers, opportunity_id_for(lead_id))


@dataclass
class Offered:
    began: float
    seconds: float
    sent: int
    blocked: float  # seconds the window was full
    behind: float  # the sender's worst lag behind its own schedule while not blocked, s

    @property
    def rate(self) -> float:
        return self.sent / self.seconds


async def offer(
    rate: float,
    seconds: float,
    window: int,
    outstanding: Callable[[], int],
    send: Callable[[float], Awaitable[None]],
) -> Offered:
    """The load generator: item n is due at `began + n / rate` and sent then with its scheduled
    time, whatever became of the items before it, as long as fewer than `window` are
    outstanding; while the window is full the schedule waits (and the wait is counted)."""
    began = time.perf_counter()
    start, end = began, began + seconds
    n, blocked, behind = 0, 0.0, 0.0
    while (now := time.perf_counter()) < end:
        due = int((now - start) * rate) + 1
        room = window - outstanding()
        if due > n and room <= 0:
            await asyncio.sleep(TICK)
            stalled = time.perf_counter() - now
            start += stalled  # the schedule resumes where it stopped
            blocked += stalled
            continue
        for _ in range(min(due - n, room)):
            at = start + n / rate
            behind = max(behind, now - at)
            await send(at)
            n += 1
        await asyncio.sleep(min(TICK, max(0.0, start + n / rate - time.perf_counter())))
    return Offered(began, time.perf_counter() - began, n, blocked, behind)


class Tracker:
    """Leads sent, and done. Done is counted over the whole stack (fresh: every opportunity in it
    is the bench's) every `count_every` s — opportunities in reporting with their follow-up
    timer in notify — less those done before the tracker began. Every `sample`-th lead is also
    followed on its own: its scheduled send time, when it is first seen in reporting and with
    its timer, looked up in batches (oldest first) every `every` s. Looking up every lead one by
    one cost the database more than a service did (100 ms a look at 3,000 outstanding)."""

    def __init__(
        self,
        db: asyncpg.Connection,
        sample: int,
        every: float,
        count_every: float,
        timers: bool = True,
    ) -> None:
        self.db = db
        self.timers = timers  # follow the sampled leads' timers too (else done = reported)
        self.sample = sample
        self.every = every
        self.count_every = count_every
        self.sent_count = 0
        self.base = 0
        self.counts: list[tuple[float, int]] = []  # (when, leads done since the start)
        self.sent: dict[uuid.UUID, float] = {}  # the sampled leads
        self.reported: dict[uuid.UUID, float] = {}
        self.timed: dict[uuid.UUID, float] = {}
        self.done: dict[uuid.UUID, float] = {}
        self._want_report: dict[uuid.UUID, None] = {}  # insertion ordered: oldest first
        self._want_timer: dict[uuid.UUID, None] = {}
        self.looks = 0
        self.look_seconds = 0.0

    async def begin(self) -> None:
        self.base = await self.db.fetchval(DONE_COUNT)
        self.counts.append((time.perf_counter(), 0))

    def add(self, opportunity_id: uuid.UUID, at: float) -> None:
        if self.sent_count % self.sample == 0:
            self.sent[opportunity_id] = at
            self._want_report[opportunity_id] = None
            if self.timers:
                self._want_timer[opportunity_id] = None
        self.sent_count += 1

    def outstanding(self) -> int:
        return self.sent_count - self.counts[-1][1]

    def done_by(self, moment: float) -> float:
        """Leads done by `moment`, interpolated between counts."""
        at = bisect.bisect_right(self.counts, (moment, math.inf))
        if at == 0:
            return 0.0
        if at == len(self.counts):
            return float(self.counts[-1][1])
        (t0, n0), (t1, n1) = self.counts[at - 1], self.counts[at]
        return n0 + (n1 - n0) * (moment - t0) / (t1 - t0)

    async def look(self, count: bool = False) -> None:
        started = time.perf_counter()
        for sql, want, seen in ((REPORTED, self._want_report, self.reported),
                                (TIMED, self._want_timer, self.timed)):  # fmt: skip
            ids = list(itertools.islice(want, POLL_CAP))
            if not ids:
                continue
            for row in await self.db.fetch(sql, ids):
                key = row["opportunity_id"]
                seen[key] = started  # visible as of this look's snapshot
                del want[key]
                if key in self.reported and (key in self.timed or not self.timers):
                    self.done[key] = started
        if count or started - self.counts[-1][0] >= self.count_every:
            counted = time.perf_counter()
            self.counts.append((counted, await self.db.fetchval(DONE_COUNT) - self.base))
        self.looks += 1
        self.look_seconds += time.perf_counter() - started

    async def follow(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.look()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every)

    async def drain(self, within: float = DRAIN) -> float:
        """Seconds until nothing is outstanding (or `within` passes)."""
        started = time.perf_counter()
        await self.look(count=True)
        while (self.outstanding() or self._want_report or self._want_timer) and (
            time.perf_counter() - started < within
        ):
            await asyncio.sleep(self.every)
            await self.look(count=True)
        return time.perf_counter() - started

    def cost(self) -> dict[str, Any]:
        return {"looks": self.looks, "mean_ms": ms(self.look_seconds / max(1, self.looks))}


def process_seconds() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used by it and its reaped children), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # from the state on
        found[int(entry.name)] = (int(fields[1]), sum(int(f) for f in fields[11:15]) / tick)
    return found


def peak_rss_mib(roots: dict[str, int], field: str = "VmHWM") -> dict[str, float]:
    """Peak resident memory (VmHWM, MiB; with `field="VmRSS"` the current one) of each service
    process and of its relay process, from /proc: read while they still run. (The
    multiprocessing resource tracker is left out.)"""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in process_seconds().items():
        children.setdefault(parent, []).append(pid)

    def hwm(pid: int) -> float | None:
        with contextlib.suppress(OSError, ValueError, StopIteration):
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            line = next(line for line in status if line.startswith(f"{field}:"))
            return round(int(line.split()[1]) / 1024, 1)
        return None

    peaks: dict[str, float] = {}
    for name, root in roots.items():
        found = hwm(root)
        if found is not None:
            peaks[name] = found
        for child in children.get(root, []):
            with contextlib.suppress(OSError):
                if b"spawn_main" not in Path(f"/proc/{child}/cmdline").read_bytes():
                    continue  # not a relay (the resource tracker)
            if (found := hwm(child)) is not None:
                peaks[f"{name} relay"] = found
    return peaks


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n")[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Cores used over a stretch of time by each named process with all its descendants (the
    bench itself without them), and by everything else on the machine."""

    def __init__(self, roots: dict[str, int | None]) -> None:
        self.roots = {name: pid for name, pid in roots.items() if pid}
        self.started = 0.0
        self.before: dict[str, float] = {}

    def _sample(self) -> dict[str, float]:
        found = process_seconds()
        children: dict[int, list[int]] = {}
        for pid, (parent, _) in found.items():
            children.setdefault(parent, []).append(pid)
        sample = {"machine": busy_seconds()}
        for name, root in self.roots.items():
            family, total = [root], 0.0
            while family:
                pid = family.pop()
                total += found.get(pid, (0, 0.0))[1]
                if root != os.getpid():
                    family.extend(children.get(pid, []))
            sample[name] = total
        return sample

    def start(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.before = self._sample()
        self.started = time.perf_counter()

    def cores(self) -> dict[str, float]:
        if not self.before:
            return {}
        seconds = time.perf_counter() - self.started
        after = self._sample()
        used = {name: (after[name] - self.before[name]) / seconds for name in after}
        used["everything else"] = used.pop("machine") - sum(used.values())
        return {name: round(value, 2) for name, value in used.items()}


def ms(seconds: float) -> float:
    return round(1000 * seconds, 1)


def latency_ms(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    return {
        "n": len(ordered),
        "p50_ms": ms(statistics.median(ordered)),
        "p99_ms": ms(percentile(ordered, 0.99)),
        "max_ms": ms(ordered[-1]),
    }


def window_figures(
    offered: Offered,
    done_by: Callable[[float], float],
    sent: dict[Any, float],
    done: dict[Any, float],
) -> dict[str, Any]:
    """Completions per second over the window (its first WARM seconds left out) and in each of
    its seconds; the backlog when it closed, and the oldest lead (of `sent`) still open then."""
    began, end = offered.began, offered.began + offered.seconds
    done_at_end = done_by(end)
    open_at_end = [end - at for key, at in sent.items() if done.get(key, math.inf) >= end]
    seconds = range(math.ceil(offered.seconds))
    return {
        "completed_per_s": (done_at_end - done_by(began + WARM)) / (offered.seconds - WARM),
        "offered_rate": RATE,
        "sent_rate": offered.rate,
        "sent": offered.sent,
        "done_in_window": round(done_at_end),
        "window_full_s": round(offered.blocked, 2),
        "sender_behind_ms": ms(offered.behind),
        "backlog_at_end": round(offered.sent - done_at_end),
        "oldest_open_at_end_s": round(max(open_at_end, default=0.0), 2),
        "completed_each_second": [
            round(done_by(min(began + s + 1, end)) - done_by(began + s)) for s in seconds
        ],
    }


async def drive_partners(
    stack: DevStack, leads: Leads, tracker: Tracker, rate: float, seconds: float, window: int
) -> Offered:
    """Partner messages at `rate` for `seconds` with a plain aiokafka producer, the tracker
    looking on meanwhile."""
    producer = AIOKafkaProducer(bootstrap_servers=stack.kafka, linger_ms=5)
    await producer.start()
    acks: list[asyncio.Future[Any]] = []

    async def send(at: float) -> None:
        lead = leads.next()
        tracker.add(lead.opportunity_id, at)
        acks.append(await producer.send(PARTNER_LEADS, lead.value, key=lead.partner_id.encode(),
                                        headers=lead.headers))  # fmt: skip

    await tracker.begin()
    stop = asyncio.Event()
    watching = asyncio.create_task(tracker.follow(stop))
    try:
        offered = await offer(rate, seconds, window, tracker.outstanding, send)
        await asyncio.gather(*acks)
    finally:
        stop.set()
        await watching
        await producer.stop()
    return offered


async def stage_changes(services: Services, db: asyncpg.Connection,
                        opportunities: list[uuid.UUID]) -> dict[str, Any]:  # fmt: skip
    """Stage commands A -> B at STAGE_RATE/s, open loop, over HTTP to pipeline; latency from the
    scheduled send until the event is read from Kafka and until reporting shows stage B."""
    rows = await db.fetch(
        "SELECT opportunity_id, version FROM pipeline.opportunity_index"
        " WHERE opportunity_id = ANY($1) AND stage = 'A'",
        opportunities,
    )
    targets = [(row["opportunity_id"], int(row["version"])) for row in rows][:STAGE_COMMANDS]
    settings = services.stack.child_settings()
    token = issue_token(Principal(role=Role.admin, user="bench"), settings.secret_for_tokens(),
                        datetime.now(UTC), timedelta(hours=1))  # fmt: skip
    clients = [
        httpx.AsyncClient(
            base_url=services.url("pipeline"),
            headers={"Authorization": f"Bearer {token}"},
            limits=httpx.Limits(max_connections=2, max_keepalive_connections=2),
            timeout=httpx.Timeout(30.0),
        )
        for _ in range(4)
    ]
    # Tansu answers an empty fetch only after fetch_max_wait_ms: keep it short (pipeline_bench).
    consumer = AIOKafkaConsumer(OPPORTUNITY_EVENTS, bootstrap_servers=services.stack.kafka,
                                auto_offset_reset="latest", group_id=None,
                                fetch_max_wait_ms=10)  # fmt: skip
    scheduled: dict[uuid.UUID, float] = {}
    on_kafka: dict[uuid.UUID, float] = {}
    in_report: dict[uuid.UUID, float] = {}
    answered: list[float] = []
    statuses: list[int] = []
    await consumer.start()
    await consumer.seek_to_end()
    for partition in consumer.assignment():
        await consumer.position(partition)
    stop = asyncio.Event()

    async def listen() -> None:
        while not stop.is_set():
            for records in (await consumer.getmany(timeout_ms=100)).values():
                now = time.perf_counter()
                for record in records:
                    if dict(record.headers).get(HEADER_EVENT_TYPE) != b"OpportunityStageChanged":
                        continue
                    key = uuid.UUID(record.key.decode()) if record.key else None
                    if key in scheduled and key not in on_kafka:
                        on_kafka[key] = now

    async def watch_report() -> None:
        while not stop.is_set():
            waiting = [key for key in scheduled if key not in in_report]
            if waiting:
                looked = time.perf_counter()
                for row in await db.fetch(REPORTED + " AND stage = 'B'", waiting):
                    in_report[row["opportunity_id"]] = looked
            await asyncio.sleep(0.02)

    async def command(client: httpx.AsyncClient, opportunity: uuid.UUID, version: int,
                      at: float) -> None:  # fmt: skip
        try:
            body = {"expected_version": version, "to_stage": "B"}
            answer = await client.post(f"/v1/opportunities/{opportunity}/stage", json=body)
            statuses.append(answer.status_code)
        except httpx.HTTPError:
            statuses.append(0)
        answered.append(time.perf_counter() - at)

    watchers = [asyncio.create_task(listen()), asyncio.create_task(watch_report())]
    try:
        began, pending = time.perf_counter(), []
        for n, (opportunity, version) in enumerate(targets):
            at = began + n / STAGE_RATE
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            scheduled[opportunity] = at
            pending.append(asyncio.create_task(
                command(clients[n % len(clients)], opportunity, version, at)))  # fmt: skip
        await asyncio.gather(*pending)
        deadline = time.monotonic() + 30
        while len(in_report) < len(targets) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.gather(*watchers)
        await consumer.stop()
        for client in clients:
            await client.aclose()
    return {
        "commands": len(targets),
        "rate": STAGE_RATE,
        "accepted": statuses.count(200),
        "http": latency_ms(answered),
        "to_kafka": latency_ms([on_kafka[k] - at for k, at in scheduled.items() if k in on_kafka]),
        "to_report": latency_ms(
            [in_report[k] - at for k, at in scheduled.items() if k in in_report]
        ),
    }


async def totals(db: asyncpg.Connection) -> dict[str, int]:
    """Every stage of the flow, counted over the whole (fresh) stack."""
    return {
        "leads": await db.fetchval("SELECT count(*) FROM capture.subject_key"),
        "opportunities": await db.fetchval("SELECT count(*) FROM pipeline.opportunity_index"),
        "funnel_rows": await db.fetchval("SELECT count(*) FROM reporting.opportunity_now"),
        "timers": await db.fetchval("SELECT count(*) FROM notify.timer WHERE kind = 'follow_up'"),
        # Events stored by capture and pipeline (what the relays put on the bus) over the run.
        "events": await db.fetchval(
            "SELECT (SELECT count(*) FROM capture.capture_events)"
            " + (SELECT count(*) FROM pipeline.pipeline_events)"
        ),
        "stream_gaps": await db.fetchval(
            "SELECT (SELECT count(*) FROM reporting.stream_gap)"
            " + (SELECT count(*) FROM notify.stream_gap)"
        ),
    }


def infrastructure(stack: DevStack) -> dict[str, int | None]:
    return {
        "postgres": stack.postgres.pid if stack.postgres else None,
        "broker": stack.broker.process.pid if stack.broker and stack.broker.process else None,
        "load generator (this process)": os.getpid(),
    }


async def launch(
    stack: DevStack, logs: Path, replicas: dict[str, int] | None = None
) -> tuple[Services, Leads]:
    """Migrate, add PARTNERS, start the four services (with `replicas` of some) and wait until
    every one is ready; the services and the partners' lead maker."""
    services = Services(stack, logs)
    await asyncio.to_thread(cli, services.env, "migrate")
    secrets = {}
    for partner in PARTNERS:
        out = await asyncio.to_thread(cli, services.env, "partner", "add", partner)
        secrets[partner] = partner_secret(out)
    try:
        services.start_all(replicas)
        await asyncio.to_thread(services.wait_ready, within=180)
    except BaseException:
        await asyncio.to_thread(services.stop)
        raise
    return services, Leads(secrets)


async def ours(stack: DevStack, logs: Path) -> dict[str, Any]:
    services, leads = await launch(stack, logs)
    db = await looking(stack)
    try:
        warm = Tracker(db, SAMPLE_LOAD, POLL_SLOW, COUNT_EVERY)
        await drive_partners(stack, leads, warm, *WARM_UP, WINDOW)
        warm_drain = await warm.drain()

        print(f"  ours: {RATE:.0f} leads/s offered for {SECONDS:.0f} s ...", flush=True)
        load = Tracker(db, SAMPLE_LOAD, POLL_SLOW, COUNT_EVERY)
        meter = CpuMeter(
            {**{name: p.pid for name, p in services.processes.items()}, **infrastructure(stack)}
        )
        meter.start()
        offered = await drive_partners(stack, leads, load, RATE, SECONDS, WINDOW)
        throughput = window_figures(offered, load.done_by, load.sent, load.done)
        throughput["cores_used"] = meter.cores()
        throughput["looks"] = load.cost()
        throughput["drain_s"] = round(await load.drain(), 1)
        throughput["done_after_drain"] = load.counts[-1][1]
        throughput["latency_to_done_sampled"] = latency_ms(
            [load.done[k] - at for k, at in load.sent.items() if k in load.done]
        )
        sustained = throughput["completed_per_s"]
        latency_rate = LATENCY_RATE if sustained >= LATENCY_RATE else sustained * 0.8
        print(f"  ours: latency at {latency_rate:.0f} leads/s ...", flush=True)
        timed = Tracker(db, SAMPLE_LATENCY, POLL_FAST, 1.0, timers=False)
        paced = await drive_partners(stack, leads, timed, latency_rate, LATENCY_SECONDS,
                                     10 * WINDOW)  # fmt: skip
        looks = timed.cost()
        timed_drain = await timed.drain()
        latency = {
            "rate": latency_rate,
            "rate_is": "the fixed 500/s"
            if latency_rate == LATENCY_RATE
            else "80 % of the sustained rate (below 500/s)",
            "seconds": LATENCY_SECONDS,
            "sent_rate": paced.rate,
            "window_full_s": round(paced.blocked, 2),
            "sender_behind_ms": ms(paced.behind),
            "poll_s": POLL_FAST,
            "sampled": f"every {SAMPLE_LATENCY}th lead",
            "looks": looks,
            "to_report": latency_ms(
                [timed.reported[k] - at for k, at in timed.sent.items() if k in timed.reported]
            ),
            "drain_s": round(timed_drain, 1),
        }
        print(f"  ours: {STAGE_COMMANDS} stage changes at {STAGE_RATE:.0f}/s ...", flush=True)
        stage = await stage_changes(services, db, sorted(timed.done, key=timed.done.__getitem__))
        counted = await totals(db)
        peaks = peak_rss_mib({name: p.pid for name, p in services.processes.items()})
    finally:
        await db.close()
        await asyncio.to_thread(services.stop)
    return {
        "throughput": throughput,
        "latency": latency,
        "stage_change": stage,
        "warm_up": {"rate": WARM_UP[0], "seconds": WARM_UP[1], "drain_s": round(warm_drain, 1)},
        "sent_total": leads.made,
        "totals": counted,
        "peak_rss_mib": peaks,
        "window": WINDOW,
        "partners": list(PARTNERS),
    }


async def crud(stack: DevStack, logs: Path) -> dict[str, Any]:
    """The CRUD baseline in its own process, driven by `offer` over HTTP like the partners."""
    port = free_port()
    log_path = logs / "crud_baseline.log"
    with log_path.open("ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "tests.perf.crud_baseline", "--port", str(port),
             "--dsn", stack.database_url],
            stdout=log, stderr=log,
        )  # fmt: skip
    client = LoadClient("127.0.0.1", port, CRUD_CONNECTIONS)
    leads = Leads(dict.fromkeys(PARTNERS, "unsigned"))
    try:
        deadline = time.monotonic() + 30
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"crud baseline exited with {server.returncode}; see {log_path}")
            with contextlib.suppress(HttpLoadError):
                if (await client.get("/healthz")).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"crud baseline not up within 30 s; see {log_path}")
            await asyncio.sleep(0.1)

        async def run(rate: float, seconds: float) -> dict[str, Any]:
            sent: dict[int, float] = {}
            done: dict[int, float] = {}
            statuses: dict[int, int] = {}
            tasks: set[asyncio.Task[None]] = set()

            async def post(n: int, body: bytes) -> None:
                try:
                    answer = await client.post("/leads", body, JSON)
                    statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
                    if answer.status_code == 201:
                        done[n] = time.perf_counter()
                except HttpLoadError:
                    statuses[0] = statuses.get(0, 0) + 1

            async def send(at: float) -> None:
                n = len(sent)
                sent[n] = at
                task = asyncio.create_task(post(n, leads.next().value))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

            meter = CpuMeter({"crud baseline": server.pid, **infrastructure(stack)})
            meter.start()
            offered = await offer(rate, seconds, CRUD_CONNECTIONS,
                                  lambda: len(tasks), send)  # fmt: skip
            finished = sorted(done.values())
            figures = window_figures(offered, lambda t: bisect.bisect_left(finished, t), sent,
                                     done)  # fmt: skip
            figures["cores_used"] = meter.cores()
            await asyncio.gather(*tasks)
            figures["statuses"] = statuses
            figures["latency_to_201"] = latency_ms([done[k] - at for k, at in sent.items()
                                                    if k in done])  # fmt: skip
            return figures

        await run(*WARM_UP)
        print(f"  CRUD baseline: {RATE:.0f} requests/s offered for {SECONDS:.0f} s ...", flush=True)
        figures = await run(RATE, SECONDS)
        db = await asyncpg.connect(stack.database_url)
        try:
            figures["rows"] = {
                table: await db.fetchval(f"SELECT count(*) FROM crud_baseline.{table}")
                for table in ("lead", "opportunity", "stage_history")
            }
        finally:
            await db.close()
    finally:
        await client.aclose()
        await terminate(server, 15)
    figures.update(
        window=CRUD_CONNECTIONS,
        clients=f"tests.perf.http_load.LoadClient, {CRUD_CONNECTIONS} keep-alive connections",
        server="python -m tests.perf.crud_baseline (uvicorn, one process, asyncpg pool of 10)",
    )
    return figures


def elsewhere(figures: dict[str, Any]) -> Any:
    return figures.get("cores_used", {}).get("everything else", "?")


async def bench_end_to_end(stack: DevStack) -> dict[str, Any]:
    """Ours, then the CRUD baseline, on `stack` (its service schemas must be fresh)."""
    started = time.perf_counter()
    logs = stack.settings.data_dir / "e2e-logs"
    logs.mkdir(parents=True, exist_ok=True)
    measured = await ours(stack, logs)
    baseline = await crud(stack, logs)
    throughput, latency = measured["throughput"], measured["latency"]
    stage = measured["stage_change"]
    print(
        f"  ours: {throughput['completed_per_s']:.0f} leads/s done"
        f" (sent {throughput['sent_rate']:.0f}/s, window full {throughput['window_full_s']} s,"
        f" {throughput['backlog_at_end']} behind at the end,"
        f" oldest {throughput['oldest_open_at_end_s']} s;"
        f" other processes on the machine used {elsewhere(throughput)} cores meanwhile)\n"
        f"  CRUD baseline: {baseline['completed_per_s']:.0f} requests/s"
        f" (sent {baseline['sent_rate']:.0f}/s, window full {baseline['window_full_s']} s;"
        f" other processes used {elsewhere(baseline)} cores)\n"
        f"  partner message -> funnel count at {latency['rate']:.0f} leads/s:"
        f" p50 {latency['to_report'].get('p50_ms')} ms,"
        f" p99 {latency['to_report'].get('p99_ms')} ms ({latency['rate_is']})\n"
        f"  stage command -> event on Kafka: p50 {stage['to_kafka'].get('p50_ms')} ms,"
        f" p99 {stage['to_kafka'].get('p99_ms')} ms; -> report updated:"
        f" p50 {stage['to_report'].get('p50_ms')} ms, p99 {stage['to_report'].get('p99_ms')} ms"
        f" ({stage['accepted']}/{stage['commands']} accepted)\n"
        f"  peak RSS (MiB) after {measured['totals']['events']} stored events: "
        + ", ".join(f"{name} {mib:.0f}" for name, mib in measured["peak_rss_mib"].items()),
        flush=True,
    )
    measured["seconds_total"] = round(time.perf_counter() - started, 1)
    measured["logs"] = str(logs)
    return {
        "name": "end to end: signed partner leads -> opportunity in reporting + reminder (leads/s)",
        "ours": throughput["completed_per_s"],
        "baseline": baseline["completed_per_s"],
        "baseline_name": "CRUD: FastAPI + asyncpg, lead + opportunity + stage row per request",
        "detail": json.dumps({"ours": measured, "baseline": baseline}),
    }


async def bench_end_to_end_own_stack(root: Path) -> dict[str, Any]:
    """The end-to-end bench on a stack of its own under `root` (fresh service schemas, a broker
    nobody else writes to), stopped after."""
    stack = DevStack(stack_settings(root / "e2e-stack"))
    await asyncio.to_thread(stack.start)
    try:
        return await bench_end_to_end(stack)
    finally:
        await asyncio.to_thread(stack.stop)
