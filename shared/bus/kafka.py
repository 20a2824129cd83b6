"""The broker factory: producers, consumers and admin clients configured one way, topic
creation, and the cluster id that tells a fresh broker from the one we knew.

Topics are only ever created explicitly with the configured partition count: auto-creation is
switched off in every metadata request (Tansu, like Kafka, would otherwise create a missing
topic with its own default partition count the moment a consumer asks for it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import struct
import uuid
from collections.abc import Iterable
from typing import Any

import aiokafka.client
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.protocol.metadata import MetadataRequest

from shared.bus.loops import being_cancelled
from shared.contracts.topics import CORE_TOPICS, PARTNER_LEADS
from shared.settings import Settings

log = logging.getLogger(__name__)

aiokafka.client.MetadataRequest = functools.partial(
    MetadataRequest, allow_auto_topic_creation=False
)

TOPIC_EXISTS = 36
# ApiVersions keys the services rely on, with the lowest max version each needs.
REQUIRED_APIS: dict[int, tuple[str, int]] = {
    0: ("Produce", 3),
    1: ("Fetch", 4),
    3: ("Metadata", 4),
    8: ("OffsetCommit", 2),
    11: ("JoinGroup", 2),
    19: ("CreateTopics", 2),
    60: ("DescribeCluster", 0),
}


class BrokerMisbehaves(RuntimeError):
    """The broker answered, but not the way DealStream needs."""


_M = 0x5BD1E995


def murmur2(data: bytes) -> int:
    """The Java client's murmur2 of a key, as aiokafka's `murmur2` computes it (a property test
    holds them equal), a word at a time: aiokafka's, byte by byte, was 38% of a relay's event
    loop (measured with py-spy on the capture bench)."""
    length = len(data)
    h = 0x9747B28C ^ length
    for k in struct.unpack_from(f"<{length // 4}I", data):
        k = (k * _M) & 0xFFFFFFFF
        k = ((k ^ (k >> 24)) * _M) & 0xFFFFFFFF
        h = ((h * _M) & 0xFFFFFFFF) ^ k
    tail, extra = length & ~3, length & 3
    if extra >= 3:
        h ^= data[tail + 2] << 16
    if extra >= 2:
        h ^= data[tail + 1] << 8
    if extra >= 1:
        h = ((h ^ data[tail]) * _M) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * _M) & 0xFFFFFFFF
    return h ^ (h >> 15)


def partition_for(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """aiokafka's DefaultPartitioner (the Java client's choice for a key) with the faster
    murmur2: a stream's events keep the partition any Kafka client would give their key."""
    if key is None:
        return random.choice(available or all_partitions)
    return all_partitions[(murmur2(key) & 0x7FFFFFFF) % len(all_partitions)]


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers(),
        "acks": "all",
        "linger_ms": 5,
        "max_batch_size": 256 * 1024,
        "partitioner": partition_for,
        "request_timeout_ms": 15000,
        "enable_idempotence": settings.idempotent_producer(),
        **settings.kafka_security(),
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


# A fetch's records, all partitions together, at most (aiokafka's default is 50 MiB): what a
# consumer holds of a backlog at once.
FETCH_MAX_BYTES = 16 << 20


def make_consumer(
    settings: Settings, group_id: str, *topics: str, **overrides: Any
) -> AIOKafkaConsumer:
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers(),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": settings.consumer_batch,
        "max_partition_fetch_bytes": settings.consumer_partition_fetch_bytes,
        "fetch_max_bytes": FETCH_MAX_BYTES,
        "session_timeout_ms": 10000,
        "heartbeat_interval_ms": 1000,
        **settings.kafka_security(),
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


def make_admin(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers(),
        request_timeout_ms=10000,
        **settings.kafka_security(),
    )


async def stop_quietly(*clients: AIOKafkaConsumer | AIOKafkaProducer | AIOKafkaAdminClient | None
                       ) -> None:  # fmt: skip
    """Stop aiokafka clients, each whatever the others did; a failure to stop is logged, not
    raised. aiokafka's consumer `stop()` can raise a CancelledError of its own: its fetcher
    cancels a fetch that is sleeping out its retry backoff after the broker went away, then
    awaits it (aio-libs/aiokafka#647; seen here after a broker was replaced). Taken for this
    task's cancellation, it would end a consumer's loop for good while the service runs on. A
    real cancellation of this task is raised again, once every client was stopped."""
    cancelled = False
    for client in clients:
        if client is None:
            continue
        name = type(client).__name__
        try:
            await (client.close() if isinstance(client, AIOKafkaAdminClient) else client.stop())
        except asyncio.CancelledError:
            if being_cancelled():
                cancelled = True
            else:
                log.warning("stopping the %s: a CancelledError of the client's own, ignored", name)
        except Exception:
            log.debug("stopping the %s failed", name, exc_info=True)
    if cancelled:
        raise asyncio.CancelledError


async def cluster_id(admin: AIOKafkaAdminClient) -> str:
    described = await admin.describe_cluster()
    return str(described["cluster_id"])


# Topic settings beyond partitions and replication. Partner messages carry the broker's time, not
# the partner's: capture decides who registered a company first by it across partitions
# (shared.bus.consumer.in_arrival_order), and a partner must not choose it. (The embedded Tansu
# broker takes the setting and keeps the producer's time: there, the fetch's own order decides.)
TOPIC_CONFIGS: dict[str, dict[str, str]] = {
    PARTNER_LEADS: {"message.timestamp.type": "LogAppendTime"},
}


async def ensure_topics(
    admin: AIOKafkaAdminClient, settings: Settings, topics: Iterable[str]
) -> None:
    """Create the topics that are missing, with the configured partitions; check the others."""
    wanted = sorted(set(topics))
    existing = set(await admin.list_topics())
    missing = [t for t in wanted if t not in existing]
    configs = {}
    if settings.topic_min_insync_replicas is not None:
        configs["min.insync.replicas"] = str(settings.topic_min_insync_replicas)
    if missing:
        response = await admin.create_topics(
            [
                NewTopic(
                    t,
                    settings.topic_partitions,
                    settings.topic_replication,
                    topic_configs={**configs, **TOPIC_CONFIGS.get(t, {})},
                )
                for t in missing
            ]
        )
        for topic, code, message in response.topic_errors:
            if code not in (0, TOPIC_EXISTS):
                raise BrokerMisbehaves(f"cannot create topic {topic}: error {code} {message}")
    described = await admin.describe_topics(wanted)
    for entry in described:
        count = len(entry["partitions"])
        if count < settings.topic_partitions:
            raise BrokerMisbehaves(
                f"topic {entry['topic']} has {count} partitions, DealStream needs "
                f"{settings.topic_partitions}: it was created by something else"
            )


async def ensure_core_topics(admin: AIOKafkaAdminClient, settings: Settings) -> None:
    await ensure_topics(admin, settings, CORE_TOPICS)


async def create_topics(settings: Settings, topics: Iterable[str]) -> None:
    """`ensure_topics` with an admin client of its own, for callers that hold none."""
    admin = make_admin(settings)
    await admin.start()
    try:
        await ensure_topics(admin, settings, topics)
    finally:
        await admin.close()


async def check_broker(settings: Settings, within: float = 30.0) -> dict[str, Any]:
    """Check the broker's API versions and a consumer-group round trip; raise BrokerMisbehaves
    with a clear message if either fails."""
    admin = make_admin(settings)
    await admin.start()
    try:
        described = await admin.describe_cluster()
        node_id = described["brokers"][0]["node_id"]
        conn = await admin._client._get_conn(node_id)  # the ApiVersions the client negotiated
        versions: dict[int, tuple[int, int]] = getattr(conn, "_versions", {}) or {}
        for key, (name, needed) in REQUIRED_APIS.items():
            if key not in versions or versions[key][1] < needed:
                raise BrokerMisbehaves(
                    f"broker at {settings.bootstrap_servers()} lacks {name} v{needed} "
                    f"(it offers {versions.get(key)})"
                )
        topic = "_dealstream.health"
        await ensure_topics(admin, settings, [topic])
    finally:
        await admin.close()
    await asyncio.wait_for(_group_round_trip(settings, topic), within)
    return {"cluster_id": str(described["cluster_id"]), "apis": len(versions)}


async def _group_round_trip(settings: Settings, topic: str) -> None:
    token = uuid.uuid4().hex.encode()
    producer = make_producer(settings)
    await producer.start()
    try:
        await producer.send_and_wait(topic, token, key=token)
    finally:
        await producer.stop()
    consumer = make_consumer(settings, f"_dealstream.health.{uuid.uuid4().hex[:8]}", topic)
    await consumer.start()
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=500)
            if any(r.value == token for records in batch.values() for r in records):
                await consumer.commit()
                return
    except Exception as exc:
        raise BrokerMisbehaves(f"consumer-group round trip failed: {exc!r}") from exc
    finally:
        await stop_quietly(consumer)
