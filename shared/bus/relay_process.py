"""The outbox relay in a process of its own, started and watched by the service's process.

Why: the relay and the service's consumers are both Python, and one process runs Python on one
core at a time. Measured here (pipeline opening opportunities from lead events), the service's
process sat at ~90% of one core — a third of it the relay — while PostgreSQL and the broker
used a fraction of the other. In a process of its own the relay runs beside the consumers
instead of taking turns with them.

The child is the same `OutboxRelay` (same advisory lock, position and republish rules): it
builds the store's application from the spec, and stops on SIGTERM: sent by the service when it
stops (SIGKILL if that takes over STOP_WITHIN seconds), or by the kernel when the service's
process dies (with a check of its parent as a fallback). Ctrl-C is left to the service. The
service restarts a child that exits on its own. What /readyz and the
benchmarks read of it (whether it leads, how far it got, how many it published) is shared
memory the child keeps current.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.sharedctypes import Synchronized
from typing import Any

from shared.bus.loops import sleep_or_stop
from shared.bus.relay import OutboxRelay, Route, relay_lag
from shared.settings import Settings
from shared.store.db import create_pool
from shared.store.eventstore import EventStoreApp

log = logging.getLogger(__name__)
STOP_WITHIN = 5.0  # seconds the child has to stop before it is killed (within serve's 10)
STOPPING_GRACE = 2.0  # seconds to wait for the service's stop after the child stopped cleanly
STEADY = 30.0  # seconds a child must have run for its exit to count as a new failure
WATCH_EVERY = 0.5  # seconds between the parent's looks at its child, and the child's at its parent
SHARE_EVERY = 0.05  # seconds between the child's updates of what the parent reads


@dataclass(frozen=True)
class RelaySpec:
    """What a relay process needs to build its relay: picklable (classes and functions by
    reference), so a freshly started interpreter can import them."""

    name: str
    app: type[EventStoreApp]
    schema: str
    route: Route


class RelayProcess:
    """A service loop (`run`) that keeps a relay process running, with the same `lag()`,
    `leading`, `position` and `published` as an in-process `OutboxRelay`."""

    def __init__(self, spec: RelaySpec, settings: Settings, app: EventStoreApp) -> None:
        self.spec = spec
        self.settings = settings
        self.app = app  # the service's own store: for the lag, nothing else
        self._context = multiprocessing.get_context("spawn")
        self._leading: Synchronized[int] = self._context.Value("b", 0, lock=False)
        self._position: Synchronized[int] = self._context.Value("q", 0, lock=False)
        self._published: Synchronized[int] = self._context.Value("q", 0, lock=False)
        self.restarts = 0
        self.pid: int | None = None  # the running child's

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def leading(self) -> bool:
        return bool(self._leading.value)

    @property
    def position(self) -> int:
        return int(self._position.value)

    @property
    def published(self) -> int:
        return int(self._published.value)

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.5
        child: BaseProcess | None = None
        try:
            while not stop.is_set():
                shared = (self._leading, self._position, self._published)
                child = self._context.Process(
                    target=_child,
                    args=(self.spec, self.settings, os.getpid(), shared),
                    name=f"relay-{self.spec.name}",
                    daemon=True,
                )
                child.start()
                self.pid, started = child.pid, time.monotonic()
                while child.is_alive() and not stop.is_set():
                    await sleep_or_stop(stop, WATCH_EVERY)
                if stop.is_set():
                    break
                if child.exitcode == 0:
                    # Stopped by a signal meant for the whole service (Ctrl-C, or a service
                    # manager signalling every process): the service's own stop follows.
                    await sleep_or_stop(stop, STOPPING_GRACE)
                    if stop.is_set():
                        break
                self._leading.value = 0
                self.restarts += 1
                if time.monotonic() - started > STEADY:
                    backoff = 0.5  # it ran fine for a while: this is a new failure
                log.warning("relay process %s exited with %s; starting it again in %.1fs",
                            self.spec.name, child.exitcode, backoff)  # fmt: skip
                await sleep_or_stop(stop, backoff)
                backoff = min(backoff * 2, 5.0)
        finally:
            # Also when the service cancels this loop: the child never outlives the stop.
            if child is not None:
                _stop_child(child)
            self._leading.value = 0
            self.pid = None

    async def lag(self) -> int | None:
        """As the in-process relay's: whether the child leads and its position are all it reads."""
        return await relay_lag(self.app, self.leading, self.position)


def _stop_child(child: BaseProcess) -> None:
    """SIGTERM (the relay finishes its batch and lets go of its lock), then SIGKILL: at most
    STOP_WITHIN seconds, blocking (it runs when the loop is stopped or cancelled)."""
    if child.is_alive():
        child.terminate()
        child.join(STOP_WITHIN)
    if child.is_alive():
        child.kill()
        child.join(2)


def relay_for(
    spec: RelaySpec, settings: Settings, app: EventStoreApp, pool: Any
) -> OutboxRelay | RelayProcess:
    """The service's relay: in a process of its own unless `relay_process` is off."""
    if settings.relay_process:
        return RelayProcess(spec, settings, app)
    return OutboxRelay(spec.name, app, spec.route, settings, pool)


def _child(
    spec: RelaySpec,
    settings: Settings,
    parent: int,
    shared: tuple[Synchronized[int], Synchronized[int], Synchronized[int]],
) -> None:
    from shared.gctune import tune_gc
    from shared.logs import setup_logging

    _die_with_parent()
    # Ctrl-C reaches every process of the terminal's group: the service stops its relay itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(f"{spec.name}-relay", settings.log_level)
    tune_gc()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_relay(spec, settings, parent, shared))


async def _relay(
    spec: RelaySpec,
    settings: Settings,
    parent: int,
    shared: tuple[Synchronized[int], Synchronized[int], Synchronized[int]],
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    pool = await create_pool(settings.dsn(), spec.schema, max_size=2)
    app = await asyncio.to_thread(spec.app, settings.dsn(), spec.schema, 2)
    relay = OutboxRelay(spec.name, app, spec.route, settings, pool)
    leading, position, published = shared

    async def share() -> None:
        while not stop.is_set():
            leading.value = int(relay.leading)
            position.value = relay.position
            published.value = relay.published
            if os.getppid() != parent:  # the service died without a word: so does its relay
                log.warning("relay %s: the service's process is gone; stopping", spec.name)
                stop.set()
            # A relay that has not come round its loop for `relay_stalled_s` (60) is stuck in a
            # call that never returns (seen in the chaos suite: after PostgreSQL crashed, a relay
            # waited on, silent, for minutes): its process exits and the service starts a fresh
            # one, as after a crash. A healthy relay's waits are far shorter: 1 s as a standby,
            # 5 s at most between retries, a batch within seconds.
            if time.monotonic() - relay.beat > settings.relay_stalled_s:
                log.error("relay %s: stuck for %.0f s; exiting to be started again",
                          spec.name, time.monotonic() - relay.beat)  # fmt: skip
                logging.shutdown()
                os._exit(75)  # no cleanup: the stuck call would hold it up too
            await sleep_or_stop(stop, SHARE_EVERY)

    sharing = asyncio.create_task(share())
    try:
        await relay.run(stop)
    finally:
        stop.set()
        await sharing
        leading.value = 0
        position.value, published.value = relay.position, relay.published
        app.close()
        try:
            await asyncio.wait_for(pool.close(), 2)
        except TimeoutError:
            pool.terminate()


def _die_with_parent() -> None:
    """Linux: SIGTERM to this process when its parent dies (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
