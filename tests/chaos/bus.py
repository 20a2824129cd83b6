"""Reading the bus the way a subscriber must when its broker can be replaced by a fresh one: a
plain aiokafka consumer (no group) from the beginning, and from the beginning of the new broker
when the cluster id changes; and the per-stream view of such a subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from shared.bus.kafka import cluster_id, stop_quietly

log = logging.getLogger("chaos")
Take = Callable[[Any], None]
BOUND = 10.0  # seconds any one call on the broker may take


class Follower:
    """Follows `topic` from its beginning until stopped; on a new broker (another cluster id,
    checked after every fetch, so a batch is only taken from the broker it was asked of) it reads
    the new broker from its beginning. `take` gets every record, repeats included."""

    def __init__(self, bootstrap: str, topic: str, take: Take) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.take = take
        self._alive = 0.0  # when the follower last came round its loop
        self.stalls = 0  # clients abandoned, stuck in a call on a broker that went away

    async def run(self, stop: asyncio.Event) -> None:
        abandoned: list[asyncio.Task[None]] = []
        while not stop.is_set():
            # A watchdog, not `wait_for`: a client call that swallows its cancellation (some of
            # aiokafka's do, on a broker that went away) would hang `wait_for` itself.
            self._alive = time.monotonic()
            following = asyncio.create_task(self._follow(stop))
            while not following.done() and time.monotonic() - self._alive < BOUND:
                await asyncio.wait({following}, timeout=0.5)
            if not following.done():
                log.info("follower of %s: stuck; starting over", self.topic)
                self.stalls += 1
                following.cancel()
                abandoned.append(following)
            elif following.cancelled() or following.exception() is not None:
                # The broker away: start over. A CancelledError raised inside the client (not
                # ours: we cancel only the stuck) ends the task as cancelled, and asking its
                # exception would raise it here, silently ending the follower for good.
                why = "cancelled" if following.cancelled() else repr(following.exception())
                log.info("follower of %s: %s; starting over", self.topic, why)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)
        if abandoned:
            await asyncio.wait(abandoned, timeout=1)

    async def _follow(self, stop: asyncio.Event) -> None:
        # Every call on the broker is bounded: a client left waiting on a broker that is gone
        # (an assignment that never comes) starts over instead of hanging the run.
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        consumer = AIOKafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            group_id=None,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            metadata_max_age_ms=1000,  # a topic made again on a new broker is seen soon
            request_timeout_ms=5000,
        )

        async def cluster() -> str:
            return await asyncio.wait_for(cluster_id(admin), BOUND)

        try:
            await asyncio.wait_for(admin.start(), BOUND)
            reading = await cluster()
            await asyncio.wait_for(consumer.start(), BOUND)
            checked = time.monotonic()
            while not stop.is_set():
                self._alive = time.monotonic()
                batch = await asyncio.wait_for(
                    consumer.getmany(timeout_ms=200, max_records=5000), BOUND
                )
                # Also while nothing comes: on a new broker whose log is shorter than this
                # reader's position, nothing would ever come.
                if not batch and time.monotonic() - checked < 1.0:
                    continue
                checked = time.monotonic()
                if await cluster() != reading:
                    return  # a new broker: read it from its beginning
                for records in batch.values():
                    for record in records:
                        self.take(record)
        finally:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_quietly(consumer, admin), BOUND)


@dataclass
class StreamWatch:
    """A subscriber of an envelope topic: per stream the last version applied; a version above
    the next one is a gap (not applied: what was skipped must come first), one at or below it a
    copy, which must carry the event id of the version it repeats."""

    applied: dict[str, int] = field(default_factory=dict)
    event_ids: dict[tuple[str, int], str] = field(default_factory=dict)
    # (event type, to_stage, lead_id) of each applied version: what the checks look up.
    events: dict[tuple[str, int], tuple[str, Any, Any]] = field(default_factory=dict)
    gaps: list[tuple[str, int, int]] = field(default_factory=list)  # stream, expected, got
    copies: int = 0
    conflicts: int = 0

    def take(self, record: Any) -> None:
        envelope = json.loads(record.value)
        stream, version = str(envelope["stream_id"]), int(envelope["stream_version"])
        current = self.applied.get(stream, 0)
        if version <= current:
            self.copies += 1
            if self.event_ids.get((stream, version)) != envelope["event_id"]:
                self.conflicts += 1
            return
        if version != current + 1:
            self.gaps.append((stream, current + 1, version))
            return
        self.applied[stream] = version
        self.event_ids[stream, version] = envelope["event_id"]
        data = envelope["data"]
        self.events[stream, version] = (envelope["event_type"], data.get("to_stage"),
                                        data.get("lead_id"))  # fmt: skip


async def follow_until(
    bootstrap: str, topic: str, take: Take, done: Callable[[], bool], within: float
) -> Follower:
    """Run a fresh follower of `topic` until `done()` or `within` seconds; the follower."""
    follower = Follower(bootstrap, topic, take)
    stop = asyncio.Event()
    task = asyncio.create_task(follower.run(stop))
    deadline = asyncio.get_running_loop().time() + within
    while not done() and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.2)
    stop.set()
    await task
    return follower
