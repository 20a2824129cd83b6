"""A consumer's Prometheus series: messages counted as handled, lag per partition while it owns
the partition, and no lag series left behind once it stops (aiokafka's stop tells no rebalance
listener, so the consumer drops them itself). And a record the handler can never take is
dead-lettered, not retried for ever in front of the rest of its partition."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from aiokafka import AIOKafkaProducer
from aiokafka.structs import TopicPartition
from prometheus_client import REGISTRY

from shared.bus.consumer import BatchConsumer, Record
from shared.bus.kafka import create_topics, make_producer
from shared.contracts.topics import DEAD_LETTER
from shared.settings import Settings
from tests.support import read_topic


async def until(condition: Callable[[], object], within: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "not within the time given"
        await asyncio.sleep(0.1)


@asynccontextmanager
async def running(consumer: BatchConsumer) -> AsyncIterator[AIOKafkaProducer]:
    """The consumer running, once it has its partitions, and a producer to feed it; both
    stopped after."""
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    producer = make_producer(consumer.settings)
    await producer.start()
    try:
        await until(lambda: consumer.running)
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

    async def handle(_: TopicPartition, records: list[Record]) -> None:
        seen.extend(records)

    consumer = BatchConsumer("metrics-probe", settings, group, [topic], handle)
    async with running(consumer) as producer:
        before = REGISTRY.get_sample_value(
            "dealstream_messages_in_total",
            {"service": group, "consumer": "metrics-probe", "topic": topic},
        )
        marker = uuid.uuid4().hex.encode()
        for n in range(20):
            await producer.send_and_wait(topic, marker, key=str(n).encode())
        await until(lambda: sum(r.value == marker for r in seen) == 20)
        await until(lambda: lag_series(group) and set(lag_series(group).values()) == {0.0})
        counted = REGISTRY.get_sample_value(
            "dealstream_messages_in_total",
            {"service": group, "consumer": "metrics-probe", "topic": topic},
        )
        assert counted is not None and counted - (before or 0) >= 20
    assert lag_series(group) == {}


async def test_a_record_the_handler_can_never_take_is_dead_lettered_and_the_rest_go_on(
    settings: Settings,
) -> None:
    group = f"poison-{uuid.uuid4().hex[:8]}"
    topic = f"test.{group}"
    await create_topics(settings, [topic])
    handled: list[bytes] = []
    # A passing outage, long enough to reach the search for poison: read again, never a dead letter.
    outages = [OSError("database away")] * 3

    async def handle(_: TopicPartition, records: list[Record]) -> None:
        if outages:
            raise outages.pop()
        if any(r.value == b"poison" for r in records):
            raise ValueError("a value no column takes")  # as a DataError from the database
        handled.extend(r.value for r in records if r.value is not None)

    consumer = BatchConsumer("poison-probe", settings, group, [topic], handle)
    async with running(consumer) as producer:
        for value in (b"one", b"poison", b"two"):  # one key: one partition, in this order
            await producer.send_and_wait(topic, value, key=b"k")
        await until(lambda: handled == [b"one", b"two"], within=60)
        assert consumer.poisoned == 1
    letters = [
        json.loads(record.value)
        for record in await read_topic(
            settings.bootstrap_servers(),
            DEAD_LETTER,
            lambda rs: any(json.loads(r.value).get("source_topic") == topic for r in rs),
        )
        if json.loads(record.value).get("source_topic") == topic
    ]
    assert len(letters) == 1 and letters[0]["reason"] == "unprocessable"
    assert letters[0]["source_offset"] == 1 and letters[0]["errors"][0]["code"] == "ValueError"
