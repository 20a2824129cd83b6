"""Stopping aiokafka clients after their broker went away: `stop_quietly` (shared.bus.kafka), on
a broker of the test's own (the session's must stay up for the other tests)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition

from shared.bus.kafka import stop_quietly
from shared.devstack import EmbeddedBroker, free_port

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
