"""A consumer's Prometheus series: messages counted as handled, lag per partition while it owns
the partition, and no lag series left behind once it stops (aiokafka's stop tells no rebalance
listener, so the consumer drops them itself). Its offsets reach Kafka as a hint, at most once a
second. And a record the handler can never take is dead-lettered, not retried for ever in front
of the rest of its partition."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition
from eventsourcing.persistence import DataError
from prometheus_client import REGISTRY

from shared.bus.consumer import (
    COMMIT_EVERY,
    Batch,
    BatchConsumer,
    Record,
    is_data_error,
    records_of,
)
from shared.bus.kafka import create_topics, make_producer
from shared.contracts.topics import DEAD_LETTER
from shared.settings import Settings
from tests.support import eventually, read_topic


@asynccontextmanager
async def running(consumer: BatchConsumer) -> AsyncIterator[AIOKafkaProducer]:
    """The consumer running, once it has its partitions, and a producer to feed it; both
    stopped after."""
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    producer = make_producer(consumer.settings)
    await producer.start()
    try:
        assert await eventually(lambda: consumer.running, bool)
        yield producer
    finally:
        await producer.stop()
        stop.set()
        await task


def lag_series(group: str) -> dict[str, float]:
    return {
        sample.labels["partition"]: sample.value
        for metric in REGISTRY.collect()
        if metric.name == "dealstream_consumer_lag"
        for sample in metric.samples
        if sample.labels["service"] == group
    }


async def test_a_consumer_counts_what_it_handles_and_its_lag_series_go_with_it(
    settings: Settings,
) -> None:
    group = f"metrics-{uuid.uuid4().hex[:8]}"
    topic = f"test.{group}"  # a topic of its own: nobody else reads these records
    await create_topics(settings, [topic])
    seen: list[Record] = []

    async def handle(batch: Batch) -> None:
        seen.extend(records_of(batch))

    consumer = BatchConsumer("metrics-probe", settings, group, [topic], handle)
    async with running(consumer) as producer:
        for n in range(20):
            await producer.send_and_wait(topic, b"m", key=str(n).encode())
        assert await eventually(lambda: len(seen), lambda n: n >= 20) == 20
        lags = await eventually(lambda: lag_series(group), lambda s: set(s.values()) == {0.0})
        assert lags and set(lags.values()) == {0.0}
        counted = REGISTRY.get_sample_value(
            "dealstream_messages_in_total",
            {"service": group, "consumer": "metrics-probe", "topic": topic},
        )
        assert counted == 20  # the group and the topic are this test's own
    assert lag_series(group) == {}


async def test_handled_offsets_reach_kafka_as_a_hint_at_most_once_a_second(
    settings: Settings,
) -> None:
    """Batch after batch, the offsets handled are committed at most every COMMIT_EVERY seconds
    (a commit a batch cost a broker round trip a batch), and the last ones still get there once
    nothing more comes."""
    group = f"commits-{uuid.uuid4().hex[:8]}"
    topic = f"test.{group}"
    await create_topics(settings, [topic])  # six partitions
    seen: list[Record] = []

    async def handle(batch: Batch) -> None:
        seen.extend(records_of(batch))

    consumer = BatchConsumer("commit-probe", settings, group, [topic], handle)
    async with running(consumer) as producer:
        began = asyncio.get_running_loop().time()
        for n in range(30):  # 3 s of records, a few at a time: a batch or more each time
            for m in range(5):
                await producer.send(topic, b"m", key=f"{n}-{m}".encode())
            await producer.flush()
            await asyncio.sleep(0.1)
        assert await eventually(lambda: len(seen), lambda n: n >= 150) == 150
        last = {
            TopicPartition(r.topic, r.partition): r.offset + 1 for r in seen
        }  # what was handled, per partition
        # The group's committed offsets, read as the consumer reads them.
        reader = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers(), group_id=group)
        await reader.start()
        try:

            async def committed() -> dict[TopicPartition, int]:
                found = await reader._coordinator.fetch_committed_offsets(set(last))
                return {tp: o.offset for tp, o in found.items()}

            assert await eventually(committed, lambda c: c == last, within=30) == last
        finally:
            await reader.stop()
        took = asyncio.get_running_loop().time() - began
    assert consumer.batches >= 20  # many batches ...
    assert consumer.commits <= took / COMMIT_EVERY + 2  # ... and a commit a second at most


async def test_a_record_the_handler_can_never_take_is_dead_lettered_and_the_rest_go_on(
    settings: Settings,
) -> None:
    group = f"poison-{uuid.uuid4().hex[:8]}"
    topic = f"test.{group}"
    await create_topics(settings, [topic])
    handled: list[bytes] = []
    # A passing outage, long enough to reach the search for poison: read again, never a dead letter.
    outages = [OSError("database away")] * 3

    async def handle(batch: Batch) -> None:
        records = records_of(batch)
        if outages:
            raise outages.pop()
        if any(r.value == b"poison" for r in records):
            raise psycopg.DataError("a value no column takes")
        handled.extend(r.value for r in records if r.value is not None)

    consumer = BatchConsumer("poison-probe", settings, group, [topic], handle)
    async with running(consumer) as producer:
        for value in (b"one", b"poison", b"two"):  # one key: one partition, in this order
            await producer.send_and_wait(topic, value, key=b"k")
        assert await eventually(lambda: handled, lambda h: len(h) >= 2, within=60) == [
            b"one",
            b"two",
        ]
        assert consumer.poisoned == 1
        taken = {"service": group, "consumer": "poison-probe", "topic": topic}
        assert REGISTRY.get_sample_value("dealstream_messages_in_total", taken) == 3
    letters = [
        {**json.loads(record.value), "key": record.key}
        for record in await read_topic(
            settings.bootstrap_servers(),
            DEAD_LETTER,
            lambda rs: any(json.loads(r.value).get("source_topic") == topic for r in rs),
        )
        if json.loads(record.value).get("source_topic") == topic
    ]
    assert len(letters) == 1 and letters[0]["reason"] == "unprocessable"
    assert letters[0]["source_offset"] == 1 and letters[0]["errors"][0]["code"] == "DataError"
    assert letters[0]["key"] == b"k"  # the record's key (clipped to DEAD_KEY_KEEP bytes)


async def test_a_fetch_of_several_partitions_is_handled_at_once_and_poison_only_holds_its_own(
    settings: Settings,
) -> None:
    """The partitions of one fetch go to the handler together (one transaction in the
    services). When that fails, each partition is handled alone: a poison record is found on
    its partition, and the other partitions' records are handled once."""
    group = f"fetch-{uuid.uuid4().hex[:8]}"
    calls: list[int] = []  # partitions of each call to the handler, whatever its outcome
    handled: list[bytes] = []

    async def apply(records: list[Record]) -> None:
        if any(r.value == b"poison" for r in records):
            raise psycopg.DataError("a value no column takes")
        handled.extend(r.value for r in records if r.value is not None)

    async def handle(batch: Batch) -> None:
        calls.append(len(batch))
        await apply(records_of(batch))

    for wave, poison in (("good", False), ("poisoned", True)):
        topic = f"test.{group}.{wave}"  # on the topic before the consumer starts: one fetch
        await create_topics(settings, [topic])
        producer = make_producer(settings)
        await producer.start()
        sent = [f"{wave}-{key}-{n}".encode() for key in "abcdefgh" for n in range(3)]
        try:
            for value in sent:
                await producer.send(topic, value, key=value[: len(wave) + 2])
                if poison and value == sent[4]:
                    await producer.send(topic, b"poison", key=value[: len(wave) + 2])
            await producer.flush()
        finally:
            await producer.stop()
        calls.clear()
        handled.clear()
        consumer = BatchConsumer(f"fetch-{wave}", settings, f"{group}-{wave}", [topic], handle)
        async with running(consumer):
            want = len(sent)
            assert await eventually(lambda: sorted(handled), lambda h, n=want: len(h) >= n,
                                    within=60) == sorted(sent)  # fmt: skip
        assert max(calls) > 1  # several partitions came in one fetch and went together
        assert len(handled) == len(sent)  # each record once, whichever way it went
        assert consumer.poisoned == (1 if poison else 0)
        assert consumer.processed == len(sent) + poison


def test_only_data_the_database_or_a_contract_refuses_is_poison() -> None:
    try:
        try:
            raise psycopg.DataError("numeric field overflow")
        except psycopg.DataError as cause:
            raise DataError("from the store") from cause
    except DataError as wrapped:
        assert is_data_error(wrapped)
    assert is_data_error(asyncpg.DataError("invalid input"))
    # A bug in a handler stops the partition: its records are not sent away as poison.
    assert not is_data_error(KeyError("owner"))
    assert not is_data_error(ValueError("bad"))
