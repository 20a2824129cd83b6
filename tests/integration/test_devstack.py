"""The embedded stack itself: topics created explicitly with 6 partitions, the broker checked, and
a clear error when the broker's port is taken."""

from __future__ import annotations

import socket

import pytest

from shared.bus.kafka import check_broker, make_admin
from shared.contracts.topics import CORE_TOPICS
from shared.devstack import DevStack, EmbeddedBroker, PortInUse
from shared.settings import Settings


async def test_all_v1_topics_exist_with_six_partitions(settings: Settings) -> None:
    admin = make_admin(settings)
    await admin.start()
    try:
        described = await admin.describe_topics(list(CORE_TOPICS))
    finally:
        await admin.close()
    assert {t["topic"]: len(t["partitions"]) for t in described} == dict.fromkeys(CORE_TOPICS, 6)


async def test_the_broker_check_passes_on_a_good_broker(settings: Settings) -> None:
    info = await check_broker(settings)
    assert info["cluster_id"].startswith("dealstream-") and info["apis"] > 10


def test_a_taken_port_is_a_clear_error(stack: DevStack, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(PortInUse, match=f"port {port} is taken.*DEALSTREAM_KAFKA_PORT"):
            EmbeddedBroker(port, tmp_path / "broker.log").start()
