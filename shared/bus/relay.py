"""The outbox relay: follows an event store's notification log and publishes what was stored.

An event is published if and only if it was stored. The position is recorded after the broker's
ack (a crash between the two republishes; consumers tolerate that), together with the cluster id
of the broker it was published to: a broker with another id is new and empty (the embedded broker
keeps nothing across restarts), so the relay creates the topics there and republishes from the
start. One relay per store is active at a time (a PostgreSQL advisory lock), whatever the number
of replicas.

Latency: a commit's NOTIFY wakes the relay at once (nothing is polled while it is busy); a batch
is one read of the notification log, in the relay's own thread so it never queues behind request
handlers, then the sends, flushed without linger (the batch is already whole), then the position.
Under load (a full batch) the next page is read while this one's acks come back.
The broker's cluster id is asked alongside the read, at most every CLUSTER_CHECK seconds, not
before and after every batch: the position is only ever trusted under the cluster id it was
recorded with, and that id changes only when the relay attaches afresh, so a batch that went to a
broker not noticed yet is republished with everything else as soon as the new id is seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import asyncpg
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.producer.message_accumulator import BatchBuilder
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Notification

from shared.bus.kafka import (
    cluster_id,
    ensure_core_topics,
    ensure_topics,
    make_admin,
    make_producer,
    partition_for,
    stop_quietly,
)
from shared.bus.loops import retrying, sleep_or_stop
from shared.contracts.envelope import HEADER_NOTIFICATION_ID, HEADER_RELAY_CLUSTER
from shared.settings import Settings
from shared.store.eventstore import EventStoreApp

log = logging.getLogger(__name__)
CLUSTER_CHECK = 0.2  # seconds: the broker's cluster id is asked at most this often
IDLE_WAIT = 0.5  # seconds between looks at the log (and the broker) while nothing is stored
ACQUIRE_WITHIN = 30.0  # seconds to wait for a database connection of the relay's pool


@dataclass(frozen=True)
class Outbound:
    topic: str
    key: bytes
    value: bytes
    headers: tuple[tuple[str, bytes], ...]


# A page of the notification log, and the messages its events become (with their ids).
Page = tuple[Sequence[Notification], list[tuple[int, Outbound]]]

# What one stored event becomes on the bus (the relay adds the notification-id header).
Route = Callable[[DomainEventProtocol[Any], Notification], Sequence[Outbound]]


@runtime_checkable
class StoredRoute(Protocol):
    """A route that can also write a stored event's messages without the event being revived
    (`None`: not this one; it goes the general way). See envelopes.PublishedRoute."""

    def stored(self, notification: Notification) -> Sequence[Outbound] | None: ...


class OutboxRelay:
    def __init__(
        self,
        name: str,
        app: EventStoreApp,
        route: Route,
        settings: Settings,
        pool: asyncpg.Pool,
    ) -> None:
        self.name = name
        self.app = app
        self.route = route
        self._stored = route.stored if isinstance(route, StoredRoute) else None
        self.settings = settings
        self.pool = pool
        self.position = 0
        self.published = 0
        self.cluster: str | None = None
        self._known_topics: set[str] = set()
        self._wake = asyncio.Event()
        self._checked_at = 0.0
        self.leading = False
        # When the relay last came round one of its loops (monotonic): a relay process whose
        # relay stops coming round is stuck in a call that never returns, and is started again
        # (`relay_stalled_s`, shared.bus.relay_process).
        self.beat = time.monotonic()
        # Reads of the notification log in a thread of their own: never behind request handlers.
        self._reader: ThreadPoolExecutor | None = None
        self._next: tuple[int, asyncio.Future[Page]] | None = None  # a read ahead, and its start

    async def run(self, stop: asyncio.Event) -> None:
        """Relay until `stop` is set; survive broker and database outages."""
        try:
            await retrying(lambda: self._lead(stop), stop, log, f"relay {self.name}")
        finally:
            if self._reader is not None:
                self._reader.shutdown(wait=False)
                self._reader = None

    async def _lead(self, stop: asyncio.Event) -> None:
        self.beat = time.monotonic()
        lock_key = zlib.crc32(f"dealstream-relay-{self.app.schema}-{self.name}".encode())
        # Bounded: a pool whose connections died with their server must not keep us waiting.
        async with self.pool.acquire(timeout=ACQUIRE_WITHIN) as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", lock_key):
                await sleep_or_stop(stop, 1.0)
                return
            channel = f"{self.app.name.lower()}_events"
            await conn.add_listener(channel, self._on_notify)
            # No linger: a batch is sent whole, and lingering would only delay its ack.
            producer = make_producer(self.settings, linger_ms=0)
            admin = make_admin(self.settings)
            self.cluster = None
            self.leading = True
            try:
                await admin.start()
                await producer.start()
                while not stop.is_set():
                    self.beat = time.monotonic()
                    if conn.is_closed():
                        raise ConnectionError("lost the relay lock's connection: stepping down")
                    self._wake.clear()  # before the batch, so a commit during it wakes the next
                    count = await self.publish_batch(producer, admin)
                    if count == 0:
                        await conn.fetchval("SELECT 1")  # still holding the lock's session?
                    if count < self.settings.relay_batch:  # else more is waiting: go on
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), IDLE_WAIT)
            finally:
                self.leading = False
                self._next = None
                await conn.remove_listener(channel, self._on_notify)
                await stop_quietly(producer, admin)
                with contextlib.suppress(Exception):
                    await conn.execute("SELECT pg_advisory_unlock($1)", lock_key)

    def _on_notify(self, *_: object) -> None:
        self._wake.set()

    async def publish_batch(self, producer: AIOKafkaProducer, admin: AIOKafkaAdminClient) -> int:
        """Publish the next batch after the recorded position; return how many events."""
        if self.cluster is None:
            await self.attach(admin)
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix=f"relay-{self.name}")
        # The read and the cluster check side by side: the check costs no time of its own.
        read = self._read_from(self.position)
        current = self.cluster
        try:
            if time.monotonic() - self._checked_at >= CLUSTER_CHECK:
                self._checked_at = time.monotonic()
                current = await cluster_id(admin)
        finally:
            notifications, messages = await read
        if current != self.cluster:
            self.cluster = None  # a new broker: attach again, republish from the start
            return 0
        if not notifications:
            return 0
        new_topics = {m.topic for _, m in messages} - self._known_topics
        if new_topics:
            await ensure_topics(admin, self.settings, new_topics)  # send_batched awaits them
            self._known_topics |= new_topics
        if len(notifications) >= self.settings.relay_batch:  # more is likely waiting
            self._next = (notifications[-1].id, self._read_from(notifications[-1].id))
        results = await send_batched(producer, [m for _, m in messages])
        failed = next((i for i, r in enumerate(results) if isinstance(r, BaseException)), None)
        if failed is None:
            done = notifications[-1].id
        else:
            # Keep what was acked in order: everything before the first failed message's event.
            done = max((n.id for n in notifications if n.id < messages[failed][0]), default=0)
        if done > self.position:
            self.published += len(messages) if failed is None else failed
            self.position = done
            # Under the cluster id of the attach: if the broker changed under this batch, the
            # next check notices and everything is published again from the start.
            await self.pool.execute(
                "UPDATE relay_position SET position = $2, updated_at = now() WHERE relay = $1",
                self.name,
                self.position,
            )
        if failed is not None:
            error = results[failed]
            assert isinstance(error, BaseException)
            raise error
        return len(notifications)

    def _read_from(self, position: int) -> asyncio.Future[Page]:
        """The page after `position`: read ahead while the last page's acks came back, if that
        read started where this one must (a failed send or a new broker moves the position
        back, and a read ahead from elsewhere is dropped), else read now."""
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == position:
            return ahead[1]
        assert self._reader is not None
        return asyncio.get_running_loop().run_in_executor(self._reader, self._read, position)

    def _read(self, position: int) -> Page:
        notifications = self.app.notifications_after(position, self.settings.relay_batch)
        return notifications, self._route_all(notifications)

    def _route_all(self, notifications: Sequence[Notification]) -> list[tuple[int, Outbound]]:
        """The page's messages, in order. A StoredRoute writes what it can straight from the
        stored events; the rest are revived first, together."""
        stored = self._stored
        routed: list[Sequence[Outbound] | None] = (
            [stored(n) for n in notifications] if stored else [None] * len(notifications)
        )
        revive = [n for n, out in zip(notifications, routed, strict=True) if out is None]
        events = iter(self.app.to_events(revive))
        messages: list[tuple[int, Outbound]] = []
        stamp = (HEADER_RELAY_CLUSTER, str(self.cluster).encode())
        for notification, out in zip(notifications, routed, strict=True):
            if out is None:
                out = self.route(next(events), notification)
            position = (HEADER_NOTIFICATION_ID, str(notification.id).encode())
            messages.extend(
                (notification.id, Outbound(m.topic, m.key, m.value, (*m.headers, position, stamp)))
                for m in out
            )
        return messages

    async def attach(self, admin: AIOKafkaAdminClient) -> None:
        """Learn the broker's cluster id; a broker we have not published to gets the topics and
        everything from the start."""
        current = await cluster_id(admin)
        self._checked_at = time.monotonic()
        await ensure_core_topics(admin, self.settings)
        self._known_topics = set()
        row = await self.pool.fetchrow(
            "SELECT cluster_id, position FROM relay_position WHERE relay = $1", self.name
        )
        if row is not None and row["cluster_id"] == current:
            self.position = int(row["position"])
        else:
            if row is not None:
                log.warning(
                    "relay %s: broker %s is new (was %s); republishing from the start",
                    self.name,
                    current,
                    row["cluster_id"],
                )
            self.position = 0
            await self.pool.execute(
                "INSERT INTO relay_position (relay, cluster_id, position) VALUES ($1, $2, 0)"
                " ON CONFLICT (relay) DO UPDATE SET cluster_id = $2, position = 0,"
                " updated_at = now()",
                self.name,
                current,
            )
        self.cluster = current

    async def lag(self) -> int | None:
        return await relay_lag(self.app, self.leading, self.position)


async def relay_lag(app: EventStoreApp, leading: bool, position: int) -> int | None:
    """How many stored events are not yet published (for /readyz and /metrics); None on a
    standby replica, whose relay waits for the lock."""
    if not leading:
        return None
    latest = await asyncio.to_thread(app.process_recorder.max_notification_id)
    return max(0, (latest or 0) - position)


async def send_batched(
    producer: AIOKafkaProducer, messages: Sequence[Outbound]
) -> list[object | BaseException]:
    """Send in order, a record batch per partition filled here (each message's outcome is its
    batch's). Per-message `send` costs a future and an accumulator pass per message: batches
    send twice the messages per second measured here. The partition is the one `send` would
    choose for the key, so each stream keeps its partition and order."""
    cluster = producer.client.cluster
    open_batches: dict[tuple[str, int], BatchBuilder] = {}
    sent: list[asyncio.Future[Any]] = []
    batch_of: list[int] = []  # per message: its batch's index in `sent`, once sent
    members: dict[tuple[str, int], list[int]] = {}

    async def flush(tp: tuple[str, int]) -> None:
        future = await producer.send_batch(open_batches.pop(tp), tp[0], partition=tp[1])
        for i in members.pop(tp):
            batch_of[i] = len(sent)
        sent.append(future)

    partitions = {}
    for topic in {m.topic for m in messages}:
        await producer.partitions_for(topic)  # waits for the topic's metadata if it has none
        partitions[topic] = (list(cluster.partitions_for_topic(topic)),
                             list(cluster.available_partitions_for_topic(topic)))  # fmt: skip
    placed: dict[tuple[str, bytes], tuple[str, int]] = {}  # a stream's events share a partition
    try:
        for i, m in enumerate(messages):
            tp = placed.get((m.topic, m.key))
            if tp is None:
                tp = placed[m.topic, m.key] = (m.topic, partition_for(m.key, *partitions[m.topic]))
            batch_of.append(-1)
            if tp not in open_batches:
                open_batches[tp] = producer.create_batch()
            appended = open_batches[tp].append(
                key=m.key, value=m.value, timestamp=None, headers=list(m.headers)
            )
            if appended is None:  # full: send it, the message starts the next
                await flush(tp)
                open_batches[tp] = producer.create_batch()
                appended = open_batches[tp].append(
                    key=m.key, value=m.value, timestamp=None, headers=list(m.headers)
                )
                assert appended is not None, "a batch's first record always goes in"
            members.setdefault(tp, []).append(i)
        for tp in list(open_batches):
            await flush(tp)
    finally:
        # A failed submission fails the page; the batches sent before it are awaited all the
        # same (their outcome retrieved, not left to the loop's "never retrieved" warning).
        outcomes = await asyncio.gather(*sent, return_exceptions=True)
    return [outcomes[b] for b in batch_of]
