"""Notify on the session's real PostgreSQL and broker: a schema per test, pipeline's events fed
through the idempotent read-model consumer, ticks at injected times, and local SMTP and webhook
servers that record what they receive."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from email import message_from_bytes, policy
from email.message import Message
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from aiosmtpd.controller import Controller

from services.notify.app import Notifier
from services.notify.timers import MIGRATIONS, timer_projector
from shared.bus.consumer import apply_read_model
from shared.bus.kafka import make_producer
from shared.clock import FixedClock
from shared.contracts.envelope import Envelope
from shared.devstack import free_port
from shared.settings import Rules, Settings
from tests.notify_support import RULES


@dataclass
class NotifyRig:
    pool: asyncpg.Pool
    settings: Settings
    producer: AIOKafkaProducer
    rules: Rules = field(default_factory=lambda: RULES)

    async def feed(self, envelopes: list[Envelope]) -> list[Envelope]:
        return await apply_read_model(self.pool, envelopes, timer_projector(self.rules))

    async def tick(self, now: datetime, settings: Settings | None = None,
                   worker: str = "test") -> dict[str, int]:  # fmt: skip
        notifier = Notifier(self.pool, settings or self.settings, self.producer, worker,
                            self.rules)  # fmt: skip
        return await notifier.tick(FixedClock(now))

    async def notifications(self, kind: str | None = None) -> list[dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT payload::text FROM notification WHERE $1::text IS NULL OR kind = $1"
            " ORDER BY issued_at, key",
            kind,
        )
        return [json.loads(r["payload"]) for r in rows]

    async def deliveries(self, notification_id: str) -> dict[str, asyncpg.Record]:
        rows = await self.pool.fetch(
            "SELECT * FROM delivery WHERE notification_id = $1", notification_id
        )
        return {r["channel"]: r for r in rows}


@pytest.fixture
async def rig(settings: Settings, schema: str, open_pool: Any) -> AsyncIterator[NotifyRig]:
    pool = await open_pool(schema, MIGRATIONS)
    producer = make_producer(settings, linger_ms=5)
    await producer.start()
    try:
        yield NotifyRig(pool, settings, producer)
    finally:
        await producer.stop()


@dataclass
class Mailbox:
    messages: list[Message] = field(default_factory=list)
    envelopes: list[tuple[str, list[str]]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content, policy=policy.default))
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 OK"


@pytest.fixture
def smtp() -> Any:
    """A real SMTP server (aiosmtpd) on a free local port."""
    box = Mailbox()
    controller = Controller(box, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield controller.port, box
    finally:
        controller.stop()


@dataclass
class Hook:
    """A local HTTP server answering 500 to the first `failures` requests, then 200."""

    failures: int
    delay: float = 0.0  # seconds before each answer
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    port: int = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in
                   (line.split(":", 1) for line in lines[1:] if ":" in line)}  # fmt: skip
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append((headers, body))
        await asyncio.sleep(self.delay)
        status = "500 Internal Server Error" if len(self.requests) <= self.failures else "200 OK"
        writer.write(
            f"HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        writer.close()


@pytest.fixture
async def webhook() -> AsyncIterator[Any]:
    servers: list[asyncio.Server] = []

    async def start(failures: int, delay: float = 0.0) -> Hook:
        hook = Hook(failures, delay)
        server = await asyncio.start_server(hook.serve, "127.0.0.1", 0)
        hook.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return hook

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()
