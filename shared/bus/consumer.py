"""The idempotent consumers of ARCHITECTURE decision 2.

`BatchConsumer` reads topics in batches and hands each fetch to a handler, all its partitions
together (one transaction in the services), or each partition's records alone after a failure;
the database, not Kafka, owns the position, so Kafka offsets are committed only as a hint. When
the broker turns out to be a new, empty one (another cluster id), the batch in hand is dropped
and every assigned partition is read again from the start: what was applied is skipped by the
handlers, what was republished is applied once.

Two handler shapes build on it:
- `record_tracked` for consumers that write events: each upstream partition's position (the
  relay's notification id, or the Kafka offset) is recorded as `Tracking(f"{upstream}:p{n}")` in
  the same transaction as the new events, and anything at or below it is skipped;
- `apply_read_model` for consumers that write read-model rows with asyncpg: the last applied
  `stream_version` per stream is kept in `stream_position` in the same transaction, anything at or
  below it is skipped, and a gap is recorded in `stream_gap` and logged as an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeAlias, TypeVar

import asyncpg
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.record.default_records import DefaultRecordBase
from aiokafka.structs import ConsumerRecord, TopicPartition
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import DataError, IntegrityError, Tracking
from pydantic import ValidationError

from shared.bus.kafka import (
    cluster_id,
    ensure_core_topics,
    make_admin,
    make_consumer,
    make_producer,
    stop_quietly,
)
from shared.bus.loops import retrying
from shared.bus.undecodable import read_past_undecodable
from shared.clock import Clock, SystemClock
from shared.contracts.envelope import HEADER_RELAY_CLUSTER, Envelope
from shared.contracts.partner import DeadLetter, FieldError
from shared.contracts.topics import DEAD_LETTER
from shared.metrics import CONSUMER_LAG, ERRORS, MESSAGES_IN, PROCESSING
from shared.settings import Settings
from shared.store.eventstore import EventStoreApp
from shared.store.recorder import SideWrite
from shared.tracing import span

log = logging.getLogger(__name__)

Record: TypeAlias = ConsumerRecord[bytes, bytes]
Batch: TypeAlias = dict[TopicPartition, list[Record]]
BatchHandler = Callable[[Batch], Awaitable[None]]
T = TypeVar("T")
# What says a record's data cannot be taken. Not ValueError, KeyError and the like: those are
# as likely a bug in a handler, which must stop the partition, not send its records away.
_DATA_ERRORS = (
    DataError,  # eventsourcing's, from psycopg's below
    psycopg.DataError,
    asyncpg.DataError,
    ValidationError,
)


DEAD_KEY_KEEP = 1024  # bytes of a poison record's key kept as its dead letter's key


class BatchConsumer:
    def __init__(
        self,
        name: str,
        settings: Settings,
        group_id: str,
        topics: Sequence[str],
        handle: BatchHandler,
        clock: Clock | None = None,
        batch: int | None = None,
        relayed: bool = True,
    ) -> None:
        self.name = name
        # Whether our outbox relays write the topics (their records carry the relay's cluster
        # stamp, checked by `published_here`); not so for a topic outsiders write, whose headers
        # are the sender's (a partner's header named like the stamp is no stamp).
        self.relayed = relayed
        self.batch = batch or settings.consumer_batch  # records per fetch, at most
        self.settings = settings
        self.clock = clock or SystemClock()  # when a dead letter was written
        self.group_id = group_id
        self.topics = list(topics)
        # A fetch's records by partition: all the fetch's partitions, or one alone after a
        # failure (then a record its handler can never take is found and dead-lettered).
        self.handle = handle
        self.cluster: str | None = None
        self.processed = 0
        self.batches = 0  # partition batches handled: processed / batches is the batch size
        self.errors = 0
        self.running = False
        self.assigned = 0  # partitions the group gave this consumer at its last rebalance
        # Seconds from the relay's publishing of the last handled record until it was handled,
        # and when that record was published (for a lag that grows while nothing is applied).
        self.delay: float | None = None
        self.applied_published: float | None = None
        self._lag_at = 0.0
        self._cluster_at = 0.0  # when the broker's cluster id was last asked
        self.lagging: set[TopicPartition] = set()  # partitions with a lag series of ours
        self._dead_letters: AIOKafkaProducer | None = None  # started at the first poison record
        self.poisoned = 0
        self.behind = 0  # messages not yet handled on them, as last measured
        self._uncommitted: dict[TopicPartition, tuple[int, str]] = {}  # handled, not committed
        self._handled: dict[TopicPartition, int] = {}  # the offset after the last handled record
        self._committed_at = 0.0
        self.commits = 0  # commits sent to Kafka

    async def run(self, stop: asyncio.Event) -> None:
        await retrying(lambda: self._consume(stop), stop, log, f"consumer {self.name}",
                       "restarting", self._failed)  # fmt: skip

    def _failed(self) -> None:
        self.errors += 1

    async def _consume(self, stop: asyncio.Event) -> None:
        admin = make_admin(self.settings)
        await admin.start()
        consumer = make_consumer(
            self.settings,
            self.group_id,
            session_timeout_ms=self.settings.consumer_session_timeout_ms,
            max_poll_records=self.batch,
        )
        failures: dict[TopicPartition, int] = {}
        try:
            self.cluster = await cluster_id(admin)
            await ensure_core_topics(admin, self.settings)
            consumer.subscribe(self.topics, listener=_Rebalance(self, consumer))
            await consumer.start()
            while not stop.is_set():
                try:
                    batch = await consumer.getmany(timeout_ms=200, max_records=self.batch)
                except UnicodeDecodeError:  # a record the client cannot parse
                    batch = await self._around_undecodable(consumer)
                if not batch:
                    await self.commit(consumer)
                    await self._measure_lag(consumer)
                    if time.monotonic() - self._cluster_at < IDLE_CLUSTER_CHECK:
                        continue
                # Checked after the fetch: if the id is still ours, the records came from it.
                # And now and then while nothing comes: on a new broker whose log is shorter
                # than the position held (the old one had repeats), nothing ever would.
                self._cluster_at = time.monotonic()
                current = await cluster_id(admin)
                if current != self.cluster:
                    log.warning(
                        "consumer %s: broker %s is new (was %s); reading from the start",
                        self.name,
                        current,
                        self.cluster,
                    )
                    self.cluster = current
                    self._uncommitted.clear()  # positions in the old broker's logs
                    self._handled.clear()
                    await ensure_core_topics(admin, self.settings)
                    partitions = consumer.assignment()
                    if partitions:
                        await consumer.seek_to_beginning(*partitions)
                    continue
                if self.relayed and not (batch := published_here(batch, current)):
                    continue
                outcomes = await self._handle(batch, failures)
                done: dict[TopicPartition, tuple[int, str]] = {}
                backoff = 0.0
                for (partition, records), outcome in zip(batch.items(), outcomes, strict=True):
                    if outcome is None:
                        self._took(partition, records)
                        failures.pop(partition, None)
                        done[partition] = (records[-1].offset + 1, self.cluster)
                        continue
                    self.errors += 1
                    ERRORS.labels(self.group_id, f"consumer:{self.name}").inc()
                    failures[partition] = failures.get(partition, 0) + 1
                    if failures[partition] >= POISON_AFTER and is_data_error(outcome):
                        try:  # the same records failed on their data each time: find which
                            await self._isolate(partition, records)
                        except Exception:
                            log.exception("consumer %s: isolating on %s failed", self.name,
                                          partition)  # fmt: skip
                        else:
                            self._took(partition, records)
                            failures.pop(partition, None)
                            done[partition] = (records[-1].offset + 1, self.cluster)
                            continue
                    log.error(
                        "consumer %s: batch on %s failed (%d in a row); reading it again",
                        self.name,
                        partition,
                        failures[partition],
                        exc_info=outcome,
                    )
                    with contextlib.suppress(Exception):  # revoked meanwhile: nothing to do
                        consumer.seek(partition, records[0].offset)
                    backoff = max(backoff, min(0.5 * 2 ** failures[partition], 10.0))
                if backoff:
                    await asyncio.sleep(backoff)
                self._uncommitted.update(done)
                self._handled.update((partition, offset) for partition, (offset, _) in done.items())
                await self.commit(consumer)
                await self._measure_lag(consumer)
        finally:
            self.running, self.assigned = False, 0
            self.forget_lag(list(self.lagging))  # stop() tells no rebalance listener
            dead_letters, self._dead_letters = self._dead_letters, None
            await stop_quietly(consumer, dead_letters, admin)

    async def commit(self, consumer: AIOKafkaConsumer, now: bool = False) -> None:
        """Commit the offsets handled since the last commit, at most every COMMIT_EVERY seconds
        (or `now`): a hint for lag dashboards and for where a partition's next owner starts
        reading, each tagged with the broker it belongs to. The database owns the position, so
        a commit is never needed for correctness, and one a batch cost a broker round trip a
        batch: at a few hundred leads/s, hundreds of commits a second across the services."""
        if not self._uncommitted or not (
            now or time.monotonic() - self._committed_at >= COMMIT_EVERY
        ):
            return
        offsets, self._uncommitted = self._uncommitted, {}
        self._committed_at = time.monotonic()
        self.commits += 1
        with contextlib.suppress(Exception):  # revoked meanwhile: its next owner commits
            await consumer.commit(offsets)

    async def _handle(
        self, batch: Batch, failures: dict[TopicPartition, int]
    ) -> list[BaseException | None]:
        """Handle a fetch: each partition's outcome. All its partitions in one call (one
        transaction, not one per partition: a fetch at a few hundred records a second brings a
        handful of records from each of six or more partitions, and the per-transaction cost
        was most of a record's); if that fails, or a partition of it failed last time, each
        partition alone, which tells a partition's trouble (a poison record) from the others'."""
        if len(batch) > 1 and not failures.keys() & batch:
            try:
                await self._timed(batch)
            except Exception:
                ERRORS.labels(self.group_id, f"fetch:{self.name}").inc()
                log.warning("consumer %s: a fetch of %d partitions failed together; each alone"
                            " next", self.name, len(batch), exc_info=True)  # fmt: skip
            else:
                return [None] * len(batch)
        # Partitions are independent streams: handle them side by side, so one partition's
        # database round trip overlaps another's decisions.
        outcomes = await asyncio.gather(
            *(self._timed({partition: records}) for partition, records in batch.items()),
            return_exceptions=True,
        )
        return [o if isinstance(o, BaseException) else None for o in outcomes]

    def _took(self, partition: TopicPartition, records: list[Record]) -> None:
        """A partition's batch is done with (handled, or handled around its poison)."""
        self.processed += len(records)
        self.batches += 1
        MESSAGES_IN.labels(self.group_id, self.name, partition.topic).inc(len(records))
        self.applied_published = records[-1].timestamp / 1000
        self.delay = max(0.0, time.time() - self.applied_published)

    async def _isolate(self, partition: TopicPartition, records: list[Record]) -> None:
        """Handle the records one by one; each that fails on its data is dead-lettered and
        stepped over, so one record the handler can never take does not stop the partition. A
        failure of another kind (the database away) ends this, and the batch is read again."""
        for record in records:
            try:
                await self._timed({partition: [record]})
            except Exception as exc:
                if not is_data_error(exc):
                    raise
                await self._dead_letter(record, exc)

    async def _dead_letter(self, record: Record, exc: BaseException) -> None:
        value = record.value or b""
        letter = DeadLetter(
            source_topic=record.topic,
            source_partition=record.partition,
            source_offset=record.offset,
            reason="unprocessable",
            errors=[FieldError(field="value", code=type(exc).__name__, message=str(exc)[:500])],
            received_at=self.clock.now(),
            value_bytes=len(value),
            value_sha256=hashlib.sha256(value).hexdigest(),  # the value stays on its topic
        )
        if self._dead_letters is None:
            self._dead_letters = make_producer(self.settings)
            await self._dead_letters.start()
        await self._dead_letters.send_and_wait(  # the key clipped: it may be what was wrong
            DEAD_LETTER, letter.model_dump_json().encode(), key=(record.key or b"")[:DEAD_KEY_KEEP]
        )
        self.poisoned += 1
        ERRORS.labels(self.group_id, f"poison:{self.name}").inc()
        log.error(
            "consumer %s: record %s/%s/%s cannot be handled (%s); dead-lettered, stepped over",
            self.name, record.topic, record.partition, record.offset, type(exc).__name__,
        )  # fmt: skip

    async def _timed(self, batch: Batch) -> None:
        started = time.perf_counter()
        attributes: dict[str, str | int] = {
            "dealstream.consumer": self.name,
            "messaging.batch.message_count": sum(map(len, batch.values())),
        }
        if len(batch) == 1:
            attributes["messaging.kafka.partition"] = next(iter(batch)).partition
        topics = ",".join(sorted({partition.topic for partition in batch}))
        try:
            with span(f"consume {topics}", **attributes):
                await self.handle(batch)
        finally:
            PROCESSING.labels(self.group_id, self.name).observe(time.perf_counter() - started)

    async def _measure_lag(self, consumer: AIOKafkaConsumer, every: float = 1.0) -> None:
        """Per assigned partition, how far the consumer is behind the broker's high watermark
        (as of the last fetch), at most once a second; at once for a partition fetched from
        for the first time (a backlog taken up after a start or a rebalance shows at its first
        batch, however fast the batches after it go)."""
        now = time.monotonic()
        first = any(p not in self.lagging and consumer.highwater(p) is not None
                    for p in consumer.assignment())  # fmt: skip
        if now - self._lag_at < every and not first:
            return
        self._lag_at = now
        behind = 0
        for partition in consumer.assignment():
            highwater = consumer.highwater(partition)
            if highwater is None:
                continue  # nothing fetched from it yet
            with contextlib.suppress(Exception):
                position = await asyncio.wait_for(consumer.position(partition), 1.0)
                if partition not in consumer.assignment():
                    continue  # revoked while asked
                CONSUMER_LAG.labels(
                    self.group_id, self.name, partition.topic, str(partition.partition)
                ).set(max(0, highwater - position))
                self.lagging.add(partition)
                behind += max(0, highwater - position)
        self.behind = behind

    def forget_lag(self, partitions: Iterable[TopicPartition]) -> None:
        """Partitions no longer this consumer's: their lag series go (the next owner's come)."""
        for partition in partitions:
            self.lagging.discard(partition)
            with contextlib.suppress(KeyError):
                CONSUMER_LAG.remove(
                    self.group_id, self.name, partition.topic, str(partition.partition)
                )

    async def _around_undecodable(self, consumer: AIOKafkaConsumer) -> Batch:
        """A fetch raised on a record the client cannot parse (shared.bus.undecodable). It had
        moved the partitions it drained before that one past records it never returned: every
        partition goes back to the record after the last one this consumer handled there, or
        where the group last committed (anything read again, the handlers skip), and each is
        read alone. The one that raises is read from its bytes, past the batch the client
        cannot parse."""
        partitions = consumer.assignment()
        known = {tp: self._handled[tp] for tp in partitions if tp in self._handled}
        for partition, offset in known.items():
            consumer.seek(partition, offset)
        await rewind(consumer, partitions - known.keys(), self.cluster)
        batch: Batch = {}
        for partition in partitions:
            try:
                fetched = await consumer.getmany(partition, timeout_ms=200, max_records=self.batch)
                records = fetched.get(partition, [])
            except UnicodeDecodeError:
                records = await self._step_over_undecodable(consumer, partition)
            if records:
                batch[partition] = records
        return batch

    async def _step_over_undecodable(
        self, consumer: AIOKafkaConsumer, partition: TopicPartition
    ) -> list[Record]:
        """The partition's records through the batch the client cannot parse, read from their
        bytes, and the consumer moved past them. A record whose header name is not UTF-8 is
        counted as an error and handed on with that name decoded with replacement, as capture
        decodes header values: its handler judges it like any record (a partner's message is
        answered; what a handler cannot take is dead-lettered as poison)."""
        read = await read_past_undecodable(
            consumer,
            partition,
            await consumer.position(partition),
            self.settings.consumer_partition_fetch_bytes,
        )
        for record, error in read.undecodable:
            self.errors += 1
            log.error(
                "consumer %s: record %s/%s/%s has a header name that is not UTF-8 (%s);"
                " read with replacement",
                self.name, record.topic, record.partition, record.offset, type(error).__name__,
            )  # fmt: skip
        consumer.seek(partition, read.next_offset)
        return sorted([*read.records, *(r for r, _ in read.undecodable)], key=lambda r: r.offset)


async def rewind(
    consumer: AIOKafkaConsumer, partitions: Iterable[TopicPartition], cluster: str | None
) -> None:
    """Start partitions where this group last committed on this broker, the others from the
    start: on assignment (a fresh broker would otherwise start a partition past records it
    never delivered), and after an undecodable record. The committed offsets are a hint, at or
    behind what was handled: the handlers skip what is read again. (Tansu keeps no commit
    metadata: there, every partition starts from the beginning.)"""
    partitions = list(partitions)
    if not partitions:
        return
    committed = await consumer._coordinator.fetch_committed_offsets(partitions)
    here = {
        tp: position.offset
        for tp, position in committed.items()
        if position.offset >= 0 and position.metadata == cluster
    }
    for tp, offset in here.items():
        consumer.seek(tp, offset)
    elsewhere = [tp for tp in partitions if tp not in here]
    if elsewhere:
        await consumer.seek_to_beginning(*elsewhere)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Logs assignments, marks the consumer running once it has partitions, and reads from the
    start any partition whose committed offset belongs to another broker (a fresh broker would
    otherwise start it past records it never delivered)."""

    def __init__(self, owner: BatchConsumer, consumer: AIOKafkaConsumer) -> None:
        self.owner = owner
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        log.info("consumer %s: revoked %s", self.owner.name, sorted(p.partition for p in revoked))
        await self.owner.commit(self.consumer, now=True)  # so their next owner starts close
        self.owner.forget_lag(revoked)  # another replica reports their lag now

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("consumer %s: assigned %s", self.owner.name, sorted(p.partition for p in assigned))
        # Measured between the revoke and now (the client keeps the old assignment meanwhile).
        self.owner.forget_lag(self.owner.lagging - assigned)
        self.owner.assigned = len(assigned)
        self.owner.running = True
        await rewind(self.consumer, assigned, self.owner.cluster)


def records_of(batch: Batch) -> list[Record]:
    """A fetch's records, partition after partition, each partition's in order."""
    return [record for records in batch.values() for record in records]


def in_arrival_order(batch: Batch) -> list[Record]:
    """A fetch's records in the order the broker took them, each partition's own order kept:
    by their timestamps when the broker stamped them all (a topic set to LogAppendTime, as
    `partner.leads.v1` is: shared.bus.kafka.TOPIC_CONFIGS). A producer's own timestamps say
    nothing a consumer may trust (a partner could backdate its messages): then the fetch's order,
    partition by partition."""
    if len(batch) == 1:
        return next(iter(batch.values()))
    stamped = DefaultRecordBase.LOG_APPEND_TIME  # the broker's time, not the producer's
    if any(r.timestamp_type != stamped for records in batch.values() for r in records):
        return records_of(batch)
    return list(heapq.merge(*batch.values(), key=lambda record: record.timestamp))


def published_here(
    batch: dict[TopicPartition, list[Record]], cluster: str
) -> dict[TopicPartition, list[Record]]:
    """The records a relay published to this broker. A relay that had not yet noticed a new,
    empty broker can put a page on it (the producer's retry of a page in flight reconnects to
    the same address) before it republishes its store from the start: taken first, that page
    would move a tracked position past events the republish brings later, or read as a gap."""
    stamp = cluster.encode()
    kept = {}
    for partition, records in batch.items():
        mine = [
            r for r in records
            if all(k != HEADER_RELAY_CLUSTER or v == stamp for k, v in r.headers or ())
        ]  # fmt: skip
        if mine:
            kept[partition] = mine
    return kept


COMMIT_EVERY = 1.0  # seconds between commits of handled offsets to Kafka, at least
IDLE_CLUSTER_CHECK = 1.0  # seconds between looks at the cluster id while nothing is fetched

# A partition batch failing this often in a row on its data is searched for the records at fault.
POISON_AFTER = 3


def is_data_error(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the data cannot be taken — a value the database
    refuses, a payload that does not validate — rather than that something is away for now."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, _DATA_ERRORS):
            return True
        seen = seen.__cause__
    return False


def _fresh(
    items: Sequence[tuple[str, int, T]], positions: dict[str, int]
) -> list[tuple[str, int, T]]:
    """Items above their upstream's position, keeping each upstream's ids strictly increasing
    (a republish repeats ids), in the order given."""
    positions = dict(positions)
    fresh: list[tuple[str, int, T]] = []
    for name, notification_id, item in items:
        if notification_id > positions[name]:
            fresh.append((name, notification_id, item))
            positions[name] = notification_id
    return fresh


def record_tracked(
    app: EventStoreApp,
    items: Sequence[tuple[str, int, T]],
    decide: Callable[[list[T]], Sequence[Aggregate]],
    side_writes: Callable[[Sequence[Aggregate]], Sequence[SideWrite]] | None = None,
) -> int:
    """Apply the items not yet tracked: each is (upstream, id, item), the upstream named as its
    `Tracking` is (a partition: `f"{topic}:p{partition}"`, or the like). `decide` turns the
    fresh items, in the order given, into aggregates with pending events, stored with each
    upstream's new position (and the service's `side_writes` for those aggregates) in one
    transaction. Blocking: run it in a worker thread. Returns how many items were applied."""
    names = list(dict.fromkeys(name for name, _, _ in items))
    for _attempt in range(3):
        fresh = _fresh(items, app.tracked_positions(names))
        if not fresh:
            return 0
        aggregates = decide([item for _, _, item in fresh])
        extra = side_writes(aggregates) if side_writes else ()
        last = {name: notification_id for name, notification_id, _ in fresh}
        try:
            app.record(aggregates, [Tracking(n, i) for n, i in last.items()], extra)
            return len(fresh)
        except IntegrityError:
            # Another replica applied them first (a rebalance): read the positions again.
            continue
    raise RuntimeError(f"tracking {names}: could not record after 3 attempts")


Projector = Callable[[asyncpg.Connection, list[Envelope]], Awaitable[None]]


async def apply_read_model(
    pool: asyncpg.Pool, envelopes: Sequence[Envelope], project: Projector
) -> list[Envelope]:
    """Apply each stream's next versions to read-model rows in one transaction; skip what was
    applied, record gaps. Returns the envelopes applied."""
    for _attempt in range(3):
        try:
            return await _apply_once(pool, envelopes, project)
        except asyncpg.UniqueViolationError:
            continue  # another replica applied a new stream at the same time: look again
    raise RuntimeError("read model: could not apply after 3 attempts")


async def _apply_once(
    pool: asyncpg.Pool, envelopes: Sequence[Envelope], project: Projector
) -> list[Envelope]:
    stream_ids = list({e.stream_id for e in envelopes})
    async with pool.acquire() as conn, conn.transaction():
        # The batch's statements planned for their values. asyncpg prepares every statement,
        # and after five runs PostgreSQL may keep one plan for all values; made while a table is
        # new and small (its statistics wait for autovacuum, a minute or more away), that plan
        # can be a sequential scan, kept until the statistics are next updated. In the
        # end-to-end bench's first minute, reporting's `opportunity_now` lookup read the whole
        # table at every batch (7.3 ms for ~37 opportunities, 12.3 M rows read in 40 s), and in
        # another run notify's timer `DELETE … WHERE opportunity_id = ANY($1)` took 13 ms a
        # batch instead of 0.15. Planning costs a statement a fraction of a millisecond, and a
        # projection runs a few per batch (arrays, not executemany). Reports keep their plans.
        await conn.execute("SET LOCAL plan_cache_mode = force_custom_plan")
        rows = await conn.fetch(
            "SELECT stream_id, version FROM stream_position WHERE stream_id = ANY($1::uuid[])"
            " FOR UPDATE",
            stream_ids,
        )
        known: dict[uuid.UUID, int] = {r["stream_id"]: r["version"] for r in rows}
        versions = dict(known)
        applied: list[Envelope] = []
        gaps: list[tuple[Any, ...]] = []
        for envelope in envelopes:
            current = versions.get(envelope.stream_id, 0)
            if envelope.stream_version <= current:
                continue
            if envelope.stream_version != current + 1:
                gaps.append(
                    (envelope.stream_id, current + 1, envelope.stream_version, envelope.event_type)
                )
                continue
            versions[envelope.stream_id] = envelope.stream_version
            applied.append(envelope)
        if gaps:
            log.error("read model: %d events arrived after a gap; not applied", len(gaps))
            await conn.executemany(
                "INSERT INTO stream_gap (stream_id, expected_version, received_version, event_type)"
                " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                gaps,
            )
        if not applied:
            return []
        await project(conn, applied)
        updates = [(s, v) for s, v in versions.items() if s in known and v != known[s]]
        inserts = [(s, v) for s, v in versions.items() if s not in known]
        # One statement each (arrays), not a round of statements per stream.
        if updates:
            await conn.execute(
                "UPDATE stream_position p SET version = u.version"
                " FROM unnest($1::uuid[], $2::int[]) AS u(stream_id, version)"
                " WHERE p.stream_id = u.stream_id",
                [s for s, _ in updates],
                [v for _, v in updates],
            )
        if inserts:
            await conn.execute(
                "INSERT INTO stream_position (stream_id, version)"
                " SELECT * FROM unnest($1::uuid[], $2::int[])",
                [s for s, _ in inserts],
                [v for _, v in inserts],
            )
        return applied
