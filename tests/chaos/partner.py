"""A partner integration under load: signed lead messages produced at a steady rate with a plain
aiokafka producer, a share of them sent again on purpose (the same message id: the duplicate path),
any message left unanswered for `patience` seconds sent again (what a real integration does; the
message id keeps it idempotent), and its replies topic followed across broker changes."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaProducer

from services.capture.domain import partner_lead_id
from shared.contracts.envelope import HEADER_NOTIFICATION_ID
from tests.chaos.bus import Follower
from tests.support import lead_value, signed_headers

log = logging.getLogger("chaos")


@dataclass
class Message:
    value: bytes
    headers: list[tuple[str, bytes]]
    sends: list[float] = field(default_factory=list)  # monotonic time of each send
    replays: int = 0  # sent again on purpose
    resends: int = 0  # sent again for want of an answer


class Partner:
    def __init__(
        self,
        bootstrap: str,
        partner_id: str,
        secret: str,
        rng: random.Random,
        rate: float,
        replay_share: float = 0.04,
        patience: float = 15.0,
    ) -> None:
        self.bootstrap = bootstrap
        self.partner_id = partner_id
        self.secret = secret
        self.rng = rng
        self.rate = rate
        self.replay_share = replay_share
        self.patience = patience
        self.messages: dict[str, Message] = {}
        # message id -> the answer's position in capture's store -> the answer
        self.answers: dict[str, dict[str, dict[str, Any]]] = {}
        self.reply_copies = 0
        self.producer_errors = 0
        self.follower = Follower(bootstrap, f"partner.{partner_id}.replies.v1", self._take_reply)
        self._producer: AIOKafkaProducer | None = None

    @property
    def sends(self) -> int:
        return sum(len(m.sends) for m in self.messages.values())

    def accepted_leads(self) -> dict[str, uuid.UUID]:
        """Message id -> lead id of every message answered `accepted`."""
        return {
            message_id: uuid.UUID(answer["lead_id"])
            for message_id, answers in self.answers.items()
            for answer in answers.values()
            if answer["status"] == "accepted"
        }

    def unanswered(self) -> list[str]:
        return [m for m in self.messages if m not in self.answers]

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            bootstrap_servers=self.bootstrap, linger_ms=5, acks="all", request_timeout_ms=10000
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    async def load(self, stop: asyncio.Event) -> None:
        """New messages at `rate` per second (a share of them replays) until `stop`."""
        started, made = time.monotonic(), 0
        while not stop.is_set():
            due = int((time.monotonic() - started) * self.rate) - made
            for _ in range(due):
                made += 1
                if self.messages and self.rng.random() < self.replay_share:
                    message_id = self.rng.choice(list(self.messages)[-2000:])
                    self.messages[message_id].replays += 1
                else:
                    message_id = f"{self.partner_id}-{uuid.uuid4().hex[:16]}"
                    # A new customer each time for certain: random phones of lead_value's kind
                    # meet again among ten thousand leads, and capture rightly merges those.
                    value = lead_value(
                        self.partner_id,
                        message_id,
                        company=f"Northwind {message_id}",
                        contact={"name": "Li Wei", "email": f"li.wei.{message_id}@example.cn",
                                 "phone": f"+86 139 {len(self.messages):08d}"},
                    )  # fmt: skip
                    headers = signed_headers(self.partner_id, message_id, self.secret, value)
                    self.messages[message_id] = Message(value, headers)
                await self._send(message_id)
            await asyncio.sleep(0.02)

    async def resend_unanswered(self, stop: asyncio.Event) -> None:
        """Every second, send again what has waited `patience` seconds for an answer."""
        while not stop.is_set():
            now = time.monotonic()
            for message_id in self.unanswered():
                message = self.messages[message_id]
                if not message.sends or now - message.sends[-1] > self.patience:
                    message.resends += 1
                    await self._send(message_id)
            await asyncio.sleep(1.0)

    async def _send(self, message_id: str) -> None:
        message = self.messages[message_id]
        assert self._producer is not None
        try:
            ack = await self._producer.send(
                "partner.leads.v1",
                message.value,
                key=self.partner_id.encode(),
                headers=message.headers,
            )
        except Exception as exc:  # no metadata while the broker restarts: sent again later
            self.producer_errors += 1
            log.debug("send of %s failed: %r", message_id, exc)
            return
        message.sends.append(time.monotonic())
        ack.add_done_callback(self._acked)

    def _acked(self, ack: asyncio.Future[Any]) -> None:
        if ack.cancelled() or ack.exception() is not None:
            self.producer_errors += 1

    def _take_reply(self, record: Any) -> None:
        reply = json.loads(record.value)
        position = dict(record.headers or ()).get(HEADER_NOTIFICATION_ID, b"?").decode()
        answers = self.answers.setdefault(reply["message_id"], {})
        if position in answers:
            self.reply_copies += 1
            return
        answers[position] = reply

    def reply_counts(self, fresh_broker_at: float | None) -> dict[str, int]:
        """The reply counts of the module docstring."""
        missing = twice = over = unanswered_sends = sends_lost = 0
        for message_id, message in self.messages.items():
            answers = list(self.answers.get(message_id, {}).values())
            if not answers:
                missing += 1
                continue
            first = [a for a in answers if a["status"] != "duplicate"]
            leads = {a.get("lead_id") for a in answers}
            lead = str(partner_lead_id(self.partner_id, message_id))
            if len(first) != 1 or leads != {lead}:
                twice += 1
            if len(answers) > len(message.sends):
                over += 1
            sends_lost += max(0, len(message.sends) - len(answers))
            if fresh_broker_at is not None and message.sends[0] > fresh_broker_at:
                unanswered_sends += len(message.sends) != len(answers)
        return {
            "missing": missing,
            "more than one first answer": twice,
            "more answers than sends": over,
            "sends on the final broker unanswered": unanswered_sends,
            "sends without an answer of their own": sends_lost,
        }
