"""Delivering notifications: `notification.events.v1` (batched, with linger), e-mail over SMTP
and a signed webhook (each retried with exponential backoff and jitter, then `dead-letter.v1`).
Deliveries are claimed with `FOR UPDATE SKIP LOCKED` and a lease, so replicas never send the
same one: the lease is renewed before each attempt, and an attempt whose delivery another replica
took over (its lease ran out while it waited its turn in a long page) is not made. Every attempt
is recorded."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import uuid
from dataclasses import dataclass
from datetime import timedelta
from email.message import EmailMessage

import aiosmtplib
import asyncpg
import httpx
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError

from shared.clock import Clock
from shared.contracts.envelope import HEADER_CONTENT_TYPE, HEADER_EVENT_TYPE
from shared.contracts.notifications import NotificationIssued, NotificationUndeliverable
from shared.contracts.topics import DEAD_LETTER, NOTIFICATION_EVENTS
from shared.settings import Settings

log = logging.getLogger("dealstream.notify")
TAKEN_OVER = "taken over"  # a claimed delivery another replica took over: its status not ours
LETTER_BODY = 4000  # characters of a too-large notification's body kept in its dead letter
SIGNATURE_HEADER = "x-dealstream-signature"
DELIVERY_HEADER = "x-dealstream-delivery"


@dataclass
class Delivery:
    id: int
    notification_id: uuid.UUID
    channel: str
    address: str | None
    attempts: int
    payload: str  # the NotificationIssued contract as JSON
    status: str = "pending"
    error: str | None = None
    tried: list[tuple[int, bool, str | None]] | None = None  # (attempt, ok, error)


def envelope_value(payload: str) -> tuple[bytes, bytes]:
    """The `NotificationIssued` envelope (key, value): each notification is its own stream."""
    data = json.loads(payload)
    value = {
        "event_id": data["notification_id"],
        "event_type": "NotificationIssued",
        "schema_version": 1,
        "stream_id": data["notification_id"],
        "stream_version": 1,
        "occurred_at": data["issued_at"],
        "correlation_id": (data.get("derived_from") or [data["notification_id"]])[0],
        "causation_id": (data.get("derived_from") or [data["notification_id"]])[0],
        "data": data,
    }
    return data["notification_id"].encode(), json.dumps(value, ensure_ascii=False).encode()


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class Dispatcher:
    def __init__(self, pool: asyncpg.Pool, settings: Settings, producer: AIOKafkaProducer,
                 clock: Clock, worker: str | None = None) -> None:  # fmt: skip
        self.pool = pool
        self.settings = settings
        self.producer = producer
        self.clock = clock
        self.worker = worker or f"notify-{uuid.uuid4().hex[:8]}"
        self.http: httpx.AsyncClient | None = None
        self.sent = 0
        self.lease = timedelta(seconds=settings.delivery_lease_seconds)

    async def __aenter__(self) -> Dispatcher:
        self.http = httpx.AsyncClient(timeout=10.0)
        return self

    async def __aexit__(self, *_: object) -> None:
        if self.http is not None:
            await self.http.aclose()

    async def claim(self, limit: int) -> list[Delivery]:
        rows = await self.pool.fetch(
            "UPDATE delivery d SET claimed_by = $1, claimed_until = now() + $3::interval"
            " FROM notification n WHERE n.notification_id = d.notification_id AND d.id IN"
            " (SELECT id FROM delivery WHERE status = 'pending'"
            "  AND (claimed_until IS NULL OR claimed_until < now())"
            "  ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)"
            " RETURNING d.id, d.notification_id, d.channel, d.address, d.attempts,"
            " n.payload::text AS payload",
            self.worker,
            limit,
            self.lease,
        )
        return [Delivery(**dict(row)) for row in rows]

    async def _renew(self, d: Delivery, wait: float = 0.0) -> bool:
        """Whether the delivery is still ours, its lease renewed for one more attempt (after
        `wait` seconds of backoff): a page's last deliveries may wait longer than the lease for
        their turn, and another replica may have taken them over meanwhile (then it sends them,
        not we)."""
        return bool(await self.pool.fetchval(
            "UPDATE delivery SET claimed_until = now() + $3::interval"
            " WHERE id = $1 AND claimed_by = $2 AND status = 'pending' RETURNING true",
            d.id, self.worker, self.lease + timedelta(seconds=wait),
        ))  # fmt: skip

    async def dispatch(self, limit: int = 2000) -> int:
        """Deliver one page of pending deliveries; how many were claimed."""
        claimed = await self.claim(limit)
        if not claimed:
            return 0
        bus = [d for d in claimed if d.channel == "kafka"]
        others = [d for d in claimed if d.channel != "kafka"]
        gate = asyncio.Semaphore(16)

        async def on_bus() -> None:
            await self._publish(bus)
            await self._record(bus)

        async def one(d: Delivery) -> None:
            async with gate:
                await self._with_retries(d)
            # Recorded as soon as it is done (a page of slow deliveries outlasts the lease); the
            # attempts of one taken over are kept, its status is the new holder's to write.
            await self._record([d])

        await asyncio.gather(on_bus(), *(one(d) for d in others))
        self.sent += sum(1 for d in claimed if d.status == "sent")
        return len(claimed)

    async def _publish(self, deliveries: list[Delivery]) -> None:
        if not deliveries:
            return
        headers = [(HEADER_EVENT_TYPE, b"NotificationIssued"),
                   (HEADER_CONTENT_TYPE, b"application/json")]  # fmt: skip
        acks: list[asyncio.Future[object]] = []
        for d in deliveries:
            key, value = envelope_value(d.payload)
            try:
                acks.append(await self.producer.send(NOTIFICATION_EVENTS, value, key=key,
                                                     headers=headers))  # fmt: skip
            except KafkaError as exc:  # refused before it was sent (too large, say): this one
                refused: asyncio.Future[object] = asyncio.get_running_loop().create_future()
                refused.set_exception(exc)
                acks.append(refused)
        results = await asyncio.gather(*acks, return_exceptions=True)
        for d, result in zip(deliveries, results, strict=True):
            error = repr(result)[:500] if isinstance(result, BaseException) else None
            d.tried = [(d.attempts + 1, error is None, error)]
            d.attempts += 1
            d.status, d.error = ("pending", error) if error else ("sent", None)
            if isinstance(result, MessageSizeTooLargeError):  # never deliverable: said so
                d.status = "dead"  # (any other failure is tried again at the next tick)
                await self._dead_letter(d)

    async def _with_retries(self, d: Delivery) -> None:
        send = {"email": self._email, "webhook": self._webhook}[d.channel]
        d.tried = []
        base = self.settings.delivery_backoff_seconds
        while True:
            if not await self._renew(d):
                d.status = TAKEN_OVER
                return
            d.attempts += 1
            try:
                await send(d)
            except Exception as exc:
                d.error = f"{type(exc).__name__}: {exc}"[:500]
                d.tried.append((d.attempts, False, d.error))
                if d.attempts >= self.settings.delivery_attempts:
                    d.status = "dead"
                    await self._dead_letter(d)
                    return
                # Exponential backoff with full jitter: retries of many deliveries spread out,
                # the delivery kept through the wait.
                wait = random.uniform(0, base * 2 ** (d.attempts - 1))
                if not await self._renew(d, wait):
                    d.status = TAKEN_OVER
                    return
                await asyncio.sleep(wait)
            else:
                d.tried.append((d.attempts, True, None))
                d.status, d.error = "sent", None
                return

    async def _email(self, d: Delivery) -> None:
        notification = NotificationIssued.model_validate_json(d.payload)
        message = EmailMessage()
        message["From"] = self.settings.smtp_from
        message["To"] = d.address or ""
        message["Subject"] = notification.subject
        # Stable across retries, so a mail system can drop a copy it already has.
        message["Message-ID"] = f"<{notification.notification_id}@dealstream>"
        message.set_content(notification.body + (f"\n\n{notification.link}"
                                                 if notification.link else ""))  # fmt: skip
        await aiosmtplib.send(
            message,
            hostname=self.settings.smtp_host,
            port=self.settings.smtp_port,
            username=self.settings.smtp_username,
            password=self.settings.smtp_password,
            start_tls=self.settings.smtp_starttls,
            timeout=10,
        )

    async def _webhook(self, d: Delivery) -> None:
        assert self.http is not None, "use the dispatcher as an async context manager"
        body = d.payload.encode()
        headers = {
            "content-type": "application/json",
            DELIVERY_HEADER: f"{d.notification_id}:webhook",
        }
        if self.settings.webhook_secret:
            headers[SIGNATURE_HEADER] = sign(self.settings.webhook_secret, body)
        response = await self.http.post(d.address or "", content=body, headers=headers)
        if response.status_code >= 300:
            raise RuntimeError(f"webhook answered {response.status_code}")

    async def _dead_letter(self, d: Delivery) -> None:
        letter = NotificationUndeliverable(
            notification_id=d.notification_id,
            channel=d.channel,  # type: ignore[arg-type]
            address=d.address,
            attempts=d.attempts,
            last_error=d.error or "",
            failed_at=self.clock.now(),
            notification=NotificationIssued.model_validate_json(d.payload),
        )
        key = str(d.notification_id).encode()
        try:
            try:
                await self.producer.send_and_wait(DEAD_LETTER, letter.model_dump_json().encode(),
                                                  key=key)  # fmt: skip
            except MessageSizeTooLargeError:  # the notification itself is too large: its head
                notification = letter.notification.model_copy(
                    update={"lines": [], "body": letter.notification.body[:LETTER_BODY]}
                )
                letter = letter.model_copy(update={"notification": notification})
                await self.producer.send_and_wait(DEAD_LETTER, letter.model_dump_json().encode(),
                                                  key=key)  # fmt: skip
        except Exception:
            log.exception("delivery %s: could not write its dead letter; will try again", d.id)
            d.status = "pending"  # keep it: the next dispatch tries the dead letter again

    async def _record(self, deliveries: list[Delivery]) -> None:
        if not deliveries:
            return
        now = self.clock.now()
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE delivery d SET status = u.status, attempts = u.attempts,"
                " last_error = u.error, claimed_by = NULL, claimed_until = NULL,"
                " sent_at = CASE WHEN u.status = 'sent' THEN $5::timestamptz END"
                " FROM unnest($1::bigint[], $2::text[], $3::int[], $4::text[])"
                " AS u(id, status, attempts, error) WHERE d.id = u.id AND d.claimed_by = $6",
                [d.id for d in deliveries],
                [d.status for d in deliveries],
                [d.attempts for d in deliveries],
                [d.error for d in deliveries],
                now,
                self.worker,
            )
            tried = [(d.id, n, ok, err) for d in deliveries for n, ok, err in d.tried or []]
            await conn.execute(
                "INSERT INTO delivery_attempt (delivery_id, attempt, attempted_at, ok, error)"
                " SELECT u.id, u.attempt, $5, u.ok, u.error"
                " FROM unnest($1::bigint[], $2::int[], $3::bool[], $4::text[])"
                " AS u(id, attempt, ok, error) ON CONFLICT DO NOTHING",
                [t[0] for t in tried],
                [t[1] for t in tried],
                [t[2] for t in tried],
                [t[3] for t in tried],
                now,
            )
