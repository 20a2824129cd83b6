"""aiokafka's CancelledErrors of its own: stopping clients after their broker went away
(`stop_quietly`, on a broker of the test's own: the session's must stay up for the other tests),
and a consumer that meets one and goes on."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

from shared.bus.consumer import Batch, BatchConsumer, records_of
from shared.bus.kafka import create_topics, make_producer, stop_quietly
from shared.devstack import EmbeddedBroker, free_port
from shared.settings import Settings

BACKOFF_MS = 3000  # long, so the stop surely falls into the fetcher's retry backoff


async def test_a_consumer_stopped_while_its_fetch_waits_out_a_backoff_stops_quietly(
    tmp_path: Path,
) -> None:
    broker = EmbeddedBroker(free_port(), tmp_path / "broker.log")
    await asyncio.to_thread(broker.start)
    consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None,
                                retry_backoff_ms=BACKOFF_MS, request_timeout_ms=2000)  # fmt: skip
    try:
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic("t", 1, 1)])
        await admin.close()
        await consumer.start()
        consumer.assign([TopicPartition("t", 0)])
        await consumer.getmany(timeout_ms=300)
        await asyncio.to_thread(broker.stop, True)
        await asyncio.sleep(0.5)  # the next fetch fails and sleeps out its backoff

        # aiokafka's own stop raises a CancelledError of its own here: the bug worked around.
        stopping = asyncio.create_task(stop_quietly(consumer))
        await asyncio.wait_for(asyncio.shield(stopping), 2 * BACKOFF_MS / 1000)
        assert stopping.done() and not stopping.cancelled()
        assert stopping.exception() is None
    finally:
        await asyncio.to_thread(broker.stop, True)


async def test_a_real_cancellation_still_cancels_once_every_client_is_stopped() -> None:
    stopped: list[str] = []

    class Slow:
        def __init__(self, name: str, seconds: float) -> None:
            self.name, self.seconds = name, seconds

        async def stop(self) -> None:
            try:
                await asyncio.sleep(self.seconds)
            finally:
                stopped.append(self.name)

    # The first is stopping when the cancellation comes; the second is stopped all the same.
    clients = (Slow("first", 10), Slow("second", 0.1))
    task = asyncio.create_task(stop_quietly(*clients))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stopped == ["first", "second"]


class _LibraryCancels(BatchConsumer):
    """A consumer whose first session meets a CancelledError that is not its task's (as
    aiokafka's `stop()` raised one); the sessions after it are the real ones."""

    sessions = 0

    async def _consume(self, stop: asyncio.Event) -> None:
        self.sessions += 1
        if self.sessions == 1:
            raise asyncio.CancelledError
        await super()._consume(stop)


async def test_a_consumer_goes_on_past_a_cancelled_error_not_its_own(settings: Settings) -> None:
    topic = f"t.cancel.{uuid.uuid4().hex[:8]}"
    await create_topics(settings, [topic])
    seen: list[bytes] = []

    async def handle(batch: Batch) -> None:
        seen.extend(r.value or b"" for r in records_of(batch))

    consumer = _LibraryCancels("cancels", settings, f"g-{topic}", [topic], handle)
    stop = asyncio.Event()
    running = asyncio.create_task(consumer.run(stop))
    producer = make_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"after", key=b"k")
    finally:
        await producer.stop()
    for _ in range(200):
        if seen:
            break
        await asyncio.sleep(0.1)
    assert seen == [b"after"] and consumer.sessions == 2 and consumer.errors == 1
    assert not running.done()
    # Its own cancellation still ends it.
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
