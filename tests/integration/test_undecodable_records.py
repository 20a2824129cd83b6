"""A record the Kafka client cannot parse, on the real broker: a header name that is not UTF-8,
written by a producer that allows it (aiokafka's own takes only text names, so the record batch is
built here byte by byte and produced as it is). aiokafka raises UnicodeDecodeError out of
`getmany` while it iterates such a batch; the consumer must lose none of the records: not those
of other partitions in the same fetch, nor those before and after it in its own batch, nor that
one, handed on with the name decoded with replacement (a partner's message is answered)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import Counter
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.protocol.produce import ProduceRequest
from aiokafka.structs import TopicPartition

from shared.bus.consumer import Batch, BatchConsumer, Record, records_of
from shared.bus.kafka import create_topics, make_producer
from shared.contracts.topics import PARTNER_LEADS, partner_replies
from shared.settings import Settings
from tests.support import (
    NOT_UTF8,
    eventually,
    lead_value,
    read_topic,
    record_batch,
    signed_headers,
)


async def produce_raw(settings: Settings, partition: TopicPartition, batch: bytes) -> int:
    """Put a record batch on the broker as it is; returns its base offset."""
    producer = make_producer(settings, enable_idempotence=False)
    await producer.start()
    try:
        await producer.partitions_for(partition.topic)  # the leader known
        leader = producer.client.cluster.leader_for_partition(partition)
        request = ProduceRequest(
            None, -1, 10_000, [(partition.topic, [(partition.partition, batch)])]
        )
        response = await producer.client.send(leader, request)
        [(_, [(_, error, offset, *_)])] = response.topics
        assert error == 0
        return int(offset)
    finally:
        await producer.stop()


async def send_good(settings: Settings, topic: str, values: dict[int, list[bytes]]) -> None:
    producer = make_producer(settings)
    await producer.start()
    try:
        for partition, batch in values.items():
            for value in batch:
                await producer.send_and_wait(topic, value, key=b"k", partition=partition)
    finally:
        await producer.stop()


def numbered(rounds: range) -> dict[int, list[bytes]]:
    """Good records for each of the six partitions, named after it and their round."""
    return {p: [f"p{p}-{n}".encode() for n in rounds] for p in range(6)}


async def test_the_client_cannot_parse_a_header_name_that_is_not_utf8(settings: Settings) -> None:
    """The premise: such a record on the broker makes aiokafka's `getmany` raise
    UnicodeDecodeError, even when asked for the record after it in the same batch."""
    topic = f"test.undecodable-{uuid.uuid4().hex[:8]}"
    await create_topics(settings, [topic])
    partition = TopicPartition(topic, 0)
    base = await produce_raw(settings, partition, record_batch([b"a", b"b", b"c"], 1))
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers())
    consumer.assign([partition])
    await consumer.start()
    try:
        for offset in (base, base + 2):
            consumer.seek(partition, offset)
            with pytest.raises(UnicodeDecodeError):
                for _ in range(25):  # until the fetch comes
                    await consumer.getmany(partition, timeout_ms=200)
    finally:
        await consumer.stop()


async def test_a_record_the_client_cannot_parse_is_read_by_the_format_and_nothing_is_lost(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    group = f"undecodable-{uuid.uuid4().hex[:8]}"
    topic = f"test.{group}"
    await create_topics(settings, [topic])  # six partitions
    bad_partition = TopicPartition(topic, 2)
    # All on the broker before the consumer starts, so its first fetches hold several
    # partitions' records together with the undecodable one.
    await send_good(settings, topic, numbered(range(4)))
    base = await produce_raw(
        settings, bad_partition, record_batch([b"before", b"bad", b"after"], 1)
    )
    await send_good(settings, topic, numbered(range(4, 8)))
    good = {v for vs in numbered(range(8)).values() for v in vs} | {b"before", b"bad", b"after"}
    handled: list[Record] = []

    async def handle(batch: Batch) -> None:
        handled.extend(records_of(batch))

    def values() -> Counter[bytes | None]:
        return Counter(r.value for r in handled)

    caplog.set_level(logging.ERROR, logger="shared.bus.consumer")
    consumer = BatchConsumer("undecodable-probe", settings, group, [topic], handle)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        await eventually(values, lambda seen: good <= set(seen), within=30)
        await asyncio.sleep(2)  # anything handled twice, or the bad one, would be by now
        seen = values()
        lost = sorted(good - set(seen))
        twice = sorted(v for v, n in seen.items() if n > 1)
        extra = sorted(set(seen) - good)
        assert (lost, twice, extra) == ([], [], []), (
            f"{len(lost)} of {len(good)} good records never handled, {len(twice)} handled more "
            f"than once, {len(extra)} not good handled; errors={consumer.errors}"
        )
        after = next(r for r in handled if r.value == b"after")
        assert (after.offset, after.headers) == (base + 2, (("x-trace", b"v"),))
        bad = next(r for r in handled if r.value == b"bad")
        assert (bad.offset, bad.headers) == (
            base + 1,
            ((NOT_UTF8.decode("utf-8", "replace"), b"v"),),
        )
        assert consumer.errors == 1 and consumer.poisoned == 0
        # It keeps running: what comes next is handled.
        await send_good(settings, topic, {p: [f"late{p}".encode()] for p in range(6)})
        late = {f"late{p}".encode() for p in range(6)}
        assert late <= set(await eventually(values, lambda seen: late <= set(seen)))
        assert consumer.running and not task.done()
    finally:
        stop.set()
        await task
    assert any(
        f"{topic}/2/{base + 1}" in r.getMessage() and "UnicodeDecodeError" in r.getMessage()
        for r in caplog.records
    )


async def test_a_partner_message_with_a_header_name_that_is_not_utf8_is_answered(
    settings: Settings,
    intake,  # type: ignore[no-untyped-def]
) -> None:
    """SPEC §3: every partner message gets a reply, this one too (its signed headers are whole;
    the name that is not UTF-8 is one more header, read with replacement)."""
    _, partner, secret = intake
    message_id = f"{partner}-{uuid.uuid4().hex}"
    value = lead_value(partner, message_id)
    headers = [(k, v) for k, v in signed_headers(partner, message_id, secret, value)]
    batch = record_batch([value], 0, key=partner.encode(), headers=headers)
    await produce_raw(settings, TopicPartition(PARTNER_LEADS, 0), batch)

    def mine(records: list[Any]) -> list[dict[str, Any]]:
        replies = [json.loads(r.value) for r in records]
        return [reply for reply in replies if reply.get("message_id") == message_id]

    replies = await read_topic(
        settings.bootstrap_servers(), partner_replies(partner), lambda rs: bool(mine(rs))
    )
    assert [reply["status"] for reply in mine(replies)] == ["accepted"]


async def test_an_undecodable_record_deep_in_its_partition_is_passed_once(
    settings: Settings,
) -> None:
    """Many fetches into its partition (fetches of 1 KiB here), the record is met once and
    passed: the partitions go back to what this consumer handled, not to the group's commit,
    which Tansu keeps without its broker tag, so that going back there reads from the start and
    meets the same record again, for ever."""
    group = f"undecodable-deep-{uuid.uuid4().hex[:8]}"
    topic = f"test.{group}"
    await create_topics(settings, [topic])
    partition = TopicPartition(topic, 0)
    before = [f"before-{n}-".encode() + b"x" * 200 for n in range(40)]  # ~9 KiB
    await send_good(settings, topic, {0: before})
    await produce_raw(settings, partition, record_batch([b"b1", b"bad", b"b2"], 1))
    await send_good(settings, topic, {0: [b"later"]})
    handled: list[Record] = []

    async def handle(batch: Batch) -> None:
        handled.extend(records_of(batch))

    small = settings.model_copy(update={"consumer_partition_fetch_bytes": 1024})
    consumer = BatchConsumer("undecodable-deep", small, group, [topic], handle)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    expected = [*before, b"b1", b"bad", b"b2", b"later"]
    try:
        await eventually(lambda: [r.value for r in handled], lambda v: b"later" in v, within=30)
        await asyncio.sleep(2)  # anything read again would be handled again by now
    finally:
        stop.set()
        await task
    assert [r.value for r in handled] == expected
    assert consumer.errors == 1
