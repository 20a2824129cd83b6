"""The faults: every `every` seconds a random service process — one of the four services, or the
relay process capture and pipeline each run beside them — is SIGKILLed (a service is started
again at once; a relay is started again by its service); once the broker is replaced by a
fresh, empty one; once PostgreSQL crashes (`pg_ctl stop -m immediate`) and starts again."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.devstack import DevStack
from tests.e2e.conftest import SERVICES, Services

RELAYS = ("capture", "pipeline")  # the services whose relay runs in a process of its own


@dataclass
class Fault:
    at: float  # seconds into the run
    what: str
    took: float = 0.0


BROKER_AT, POSTGRES_AT = 0.35, 0.65  # the fresh broker and the PostgreSQL crash, into the run


@dataclass
class Faults:
    stack: DevStack
    services: Services
    rng: random.Random
    seconds: float
    every: float = 10.0
    happened: list[Fault] = field(default_factory=list)
    fresh_broker_at: float | None = None  # monotonic: from then on, sends reach the final broker

    @property
    def kills(self) -> int:
        return sum(f.what.startswith("SIGKILL") for f in self.happened)

    def count(self, what: str) -> int:
        return sum(f.what.startswith(what) for f in self.happened)

    def describe(self) -> str:
        return f"a kill every {self.every:.0f}s"

    def schedule(self) -> list[tuple[float, Callable[[], Awaitable[str]]]]:
        """(seconds into the run, fault) of every fault of the run."""
        plan = [(self.seconds * BROKER_AT, self.replace_broker),
                (self.seconds * POSTGRES_AT, self.crash_postgres)]  # fmt: skip
        return plan + [(t, self.kill_one) for t in _every(self.every, self.seconds)]

    async def run(self, stop: asyncio.Event) -> None:
        started = time.monotonic()
        for at, fault in sorted(self.schedule(), key=lambda p: p[0]):
            if stop.is_set():
                return  # the load is over: no fault falls into the drain
            wait = started + at - time.monotonic()
            if wait > 0:
                try:
                    await asyncio.wait_for(stop.wait(), wait)
                    return
                except TimeoutError:
                    pass
            begun = time.monotonic()
            what = await fault()
            self.happened.append(Fault(round(begun - started, 1), what, time.monotonic() - begun))
            print(f"  t={begun - started:5.1f}s  {what} ({time.monotonic() - begun:.1f}s)",
                  flush=True)  # fmt: skip

    async def kill_one(self) -> str:
        target = self.rng.choice([*SERVICES, *(f"{s}-relay" for s in RELAYS)])
        service = target.removesuffix("-relay")
        if target.endswith("-relay"):
            pids = relay_pids(self.services.processes[service].pid)
            if pids:
                try:
                    os.kill(pids[0], signal.SIGKILL)
                    return f"SIGKILL {target} (pid {pids[0]}; its service starts it again)"
                except ProcessLookupError:
                    pass  # it exited since the look: its service is killed instead
            target = service  # its relay not running just now (restarting): the service then
        pid = self.services.processes[service].pid
        await asyncio.to_thread(self.services.kill, service)
        self.services.start(service)
        return f"SIGKILL {service} (pid {pid}), started again"

    async def replace_broker(self) -> str:
        old = self.stack.broker.cluster_id if self.stack.broker else "?"
        await asyncio.to_thread(self.stack.restart_broker)
        self.fresh_broker_at = time.monotonic()
        new = self.stack.broker.cluster_id if self.stack.broker else "?"
        return f"broker replaced by a fresh, empty one ({old[-8:]} -> {new[-8:]})"

    async def crash_postgres(self) -> str:
        await asyncio.to_thread(self.stack.restart_postgres, "immediate")
        return "PostgreSQL crashed (immediate stop) and started again"


SCALED = ("pipeline", "reporting", "notify")  # the services the scale-out run replicates


@dataclass
class Rebalances(Faults):
    """Scale-out under load: the consumer services run as several replicas in their consumer
    groups; at a third of the run one more replica of each joins, at two thirds one of each is
    SIGKILLed and not started again. Each change moves partitions between the replicas (a
    rebalance) while messages flow. The first replica of each service is spared: the run's
    HTTP calls go to it, as a load balancer would route around a dead one."""

    def describe(self) -> str:
        return "a replica of each added, then one of each killed"

    def schedule(self) -> list[tuple[float, Callable[[], Awaitable[str]]]]:
        return [(self.seconds / 3, self.add_replicas), (2 * self.seconds / 3, self.kill_replicas)]

    async def add_replicas(self) -> str:
        added = [self.services.add(service) for service in SCALED]
        await asyncio.to_thread(self.services.wait_ready, *added)
        return f"added {', '.join(added)} (ready)"

    async def kill_replicas(self) -> str:
        killed = []
        for service in SCALED:
            name = self.rng.choice(self.services.replicas(service)[1:])
            pid = self.services.processes[name].pid
            await asyncio.to_thread(self.services.kill, name)
            killed.append(f"{name} (pid {pid})")
        return f"SIGKILL {', '.join(killed)}, not started again"


def _every(every: float, seconds: float) -> list[float]:
    """Half a period in, then every period: the kills fall between the other faults."""
    return [
        every * (n + 0.5) for n in range(int(seconds // every) + 1) if every * (n + 0.5) < seconds
    ]


def relay_pids(parent: int) -> list[int]:
    """The relay processes a service started (multiprocessing's spawned children)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"multiprocessing" in cmdline:
            if b"resource_tracker" not in cmdline:
                found.append(int(stat.parent.name))
    return found
