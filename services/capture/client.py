"""A small partner client: sign a lead, send it to `partner.leads.v1`, and await its one reply on
`partner.<partner_id>.replies.v1`. Depends on aiokafka and the standard library only, so a
partner can copy this file as it is.

    async with PartnerClient("broker:9092", "acme", secret) as client:
        reply = await client.submit({"company": {...}, "contact": {...}, ...})
        print(reply["status"], reply.get("lead_id"))
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

LEADS_TOPIC = "partner.leads.v1"


def signature(secret: str, value: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), value, hashlib.sha256).hexdigest()


class PartnerClient:
    def __init__(self, bootstrap_servers: str, partner_id: str, secret: str, **kafka: Any) -> None:
        self.partner_id = partner_id
        self.secret = secret
        self.replies_topic = f"partner.{partner_id}.replies.v1"
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, **kafka)
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, group_id=None,
                                          **kafka)  # fmt: skip
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> PartnerClient:
        await self._producer.start()
        await self._consumer.start()
        partitions = await self._partitions()
        self._consumer.assign(partitions)
        await self._consumer.seek_to_end(*partitions)  # replies to what we send from now on
        for partition in partitions:
            await self._consumer.position(partition)
        self._reader = asyncio.create_task(self._read_replies())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        try:
            await self._consumer.stop()
        except asyncio.CancelledError:
            # aiokafka's own when the broker went away (aio-libs/aiokafka#647: its fetcher
            # awaits a fetch it cancelled); only a cancellation of this task goes on.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
        await self._producer.stop()

    async def _partitions(self) -> list[TopicPartition]:
        for _ in range(50):
            found = self._consumer.partitions_for_topic(self.replies_topic)
            if found:
                return [TopicPartition(self.replies_topic, p) for p in sorted(found)]
            await self._consumer._client.force_metadata_update()
            await asyncio.sleep(0.1)
        raise RuntimeError(f"no topic {self.replies_topic}: is the partner registered?")

    async def _read_replies(self) -> None:
        while True:
            for records in (await self._consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    reply = json.loads(record.value)
                    waiter = self._waiting.pop(str(reply.get("message_id")), None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(reply)

    async def send(self, lead: dict[str, Any], message_id: str | None = None) -> str:
        """Sign and send one lead; returns its message id (the idempotency key)."""
        message_id = message_id or f"{self.partner_id}-{uuid.uuid4().hex}"
        body = {
            **lead,
            "message_id": message_id,
            "partner_id": self.partner_id,
            "submitted_at": lead.get("submitted_at")
            or datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        }
        value = json.dumps(body, ensure_ascii=False).encode()
        self._waiting.setdefault(message_id, asyncio.get_running_loop().create_future())
        await self._producer.send_and_wait(
            LEADS_TOPIC,
            value,
            key=self.partner_id.encode(),
            headers=[
                ("x-partner-id", self.partner_id.encode()),
                ("x-message-id", message_id.encode()),
                ("x-signature", signature(self.secret, value).encode()),
            ],
        )
        return message_id

    async def reply(self, message_id: str, within: float = 30.0) -> dict[str, Any]:
        waiter = self._waiting.setdefault(message_id, asyncio.get_running_loop().create_future())
        return await asyncio.wait_for(waiter, within)

    async def submit(self, lead: dict[str, Any], message_id: str | None = None,
                     within: float = 30.0) -> dict[str, Any]:  # fmt: skip
        """Send one lead and wait for its reply: accepted, duplicate, conflict or rejected."""
        return await self.reply(await self.send(lead, message_id), within)
