"""Capture on the bus: what its stored events become (lead events, partner replies, dead
letters), the consumer of `partner.leads.v1`, and the consumer of `opportunity.events.v1` that
tells dedupe which customers' deals are still open."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Notification
from eventsourcing.utils import resolve_topic
from pydantic import BaseModel, Field, ValidationError

from services.capture.app import CaptureApp
from services.capture.domain import (
    Incoming,
    Lead,
    PartnerMessage,
    Registration,
)
from services.capture.partners import PartnerSecrets
from shared.bus.consumer import Batch, BatchConsumer, Record, in_arrival_order, records_of
from shared.bus.envelopes import PublishedRoute, header, stored_state
from shared.bus.relay import Outbound
from shared.clock import Clock
from shared.contracts.envelope import HEADER_CONTENT_TYPE, HEADER_EVENT_TYPE
from shared.contracts.partner import HEADER_PARTNER_ID
from shared.contracts.topics import (
    DEAD_LETTER,
    LEAD_EVENTS,
    OPPORTUNITY_EVENTS,
    PARTNER_LEADS,
    partner_replies,
)
from shared.settings import Settings
from shared.store.recorder import columns

log = logging.getLogger(__name__)
JSON = ((HEADER_CONTENT_TYPE, b"application/json"),)


def answers(
    partner_id: str | None, reply: dict[str, Any] | None, dead_letter: dict[str, Any] | None
) -> list[Outbound]:
    """What a handled partner message becomes: its reply on the partner's topic, a dead letter,
    or both, written by orjson (UTF-8, no spaces): in the capture bench the standard library's
    `json.dumps` of them took a tenth of the relay's routing. Their texts are all encodable
    (headers decoded with replacement, `FieldError`'s texts made so), which orjson requires."""
    out = []
    if reply is not None and partner_id is not None:
        out.append(
            Outbound(
                topic=partner_replies(partner_id),
                key=str(reply["message_id"]).encode(),
                value=orjson.dumps(reply),
                headers=JSON,
            )
        )
    if dead_letter is not None:
        partner = dead_letter.get("partner_id") or ""
        out.append(
            Outbound(
                topic=DEAD_LETTER,
                key=str(partner).encode(),
                value=orjson.dumps(dead_letter),
                headers=(*JSON, (HEADER_PARTNER_ID, str(partner).encode())),
            )
        )
    return out


_ENVELOPED = (Lead.Captured, Lead.Merged, Lead.Unmerged, Lead.Forgotten,
              Registration.Registered, Registration.Changed)  # fmt: skip


class CaptureRoute:
    """Capture's stored events as bus messages: lead and registration events as v1 envelopes on
    `lead.events.v1`, handled partner messages as their replies and dead letters.

    `stored` (the relay's StoredRoute) writes them straight from the stored JSON: replies and
    dead letters are JSON in the state already, registration and merge events are enveloped as
    pipeline's are. A captured lead goes the general way: its contact is sealed in the store,
    and is opened with its key as the page is revived."""

    def __init__(self) -> None:
        self._envelopes = PublishedRoute(LEAD_EVENTS, "capture", _ENVELOPED)

    def __call__(
        self, event: DomainEventProtocol[uuid.UUID], notification: Notification
    ) -> Sequence[Outbound]:
        if isinstance(event, PartnerMessage.Handled):
            return answers(event.partner_id, event.reply, event.dead_letter)
        return self._envelopes(event, notification)  # [] for any other event

    def stored(self, notification: Notification) -> Sequence[Outbound] | None:
        event_class = resolve_topic(notification.topic)  # cached by the library
        if event_class is Lead.Captured:
            return None  # sealed: revived with its key
        if event_class is not PartnerMessage.Handled:
            return self._envelopes.stored(notification)
        state = stored_state(notification)
        if state is None:
            return None
        try:
            return answers(state["partner_id"], state["reply"], state["dead_letter"])
        except (KeyError, TypeError):
            return None


route = CaptureRoute()


def incoming(record: Record) -> Incoming:
    headers: dict[str, str] = {}
    for key, value in record.headers or ():
        headers[key.lower()] = bytes(value or b"").decode("utf-8", "replace")
    return Incoming(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        value=record.value or b"",
        headers=headers,
    )


def partner_intake(
    app: CaptureApp, settings: Settings, secrets: PartnerSecrets, clock: Clock
) -> BatchConsumer:
    """The consumer of `partner.leads.v1`: every message answered once, none ever blocks it."""

    async def handle(batch: Batch) -> None:
        # In the order the broker took them, whatever their partitions, where it stamped them
        # (in_arrival_order): who registered a company first is decided by it.
        arrived = time.monotonic()
        records = in_arrival_order(batch)
        messages = [incoming(r) for r in records]
        now = clock.now()
        secrets_of = await secrets.current(now)
        loop = asyncio.get_running_loop()

        def refresh() -> dict[str, list[str]]:  # from the worker thread, on this loop
            return asyncio.run_coroutine_threadsafe(secrets.reloaded(now, arrived), loop).result(30)

        names = {p.partition: f"{PARTNER_LEADS}:{consumer.cluster}:p{p.partition}" for p in batch}
        await asyncio.to_thread(
            app.handle_partner_fetch,
            names,
            messages,
            secrets_of,
            now,
            settings.rules(),  # per batch: an edited dealstream.toml applies without a restart
            refresh,
        )

    consumer = BatchConsumer("partner-intake", settings, "capture", [PARTNER_LEADS], handle, clock,
                             relayed=False)  # partners write it, not a relay  # fmt: skip
    return consumer


# Whether a deal is open after each event that opens or closes it (the others leave it as it is,
# and are not even decoded): a recycled deal is still open, back in the pool.
OPEN_AFTER = {
    "OpportunityOpened": True,
    "OpportunityWon": False,
    "OpportunityLost": False,
    "OpportunityReopened": True,
    "OpportunityReactivated": True,
}
# Each deal's newest state wins, whatever order replicas and redeliveries write in.
UPSERT_DEALS = """
INSERT INTO customer_deal (opportunity_id, lead_id, open, version)
SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bool[], $4::int[])
ON CONFLICT (opportunity_id) DO UPDATE SET
    lead_id = coalesce(customer_deal.lead_id, EXCLUDED.lead_id),
    open = CASE WHEN EXCLUDED.version > customer_deal.version THEN EXCLUDED.open
                ELSE customer_deal.open END,
    version = greatest(customer_deal.version, EXCLUDED.version)
"""


class _DealData(BaseModel):
    lead_id: uuid.UUID | None = None  # OpportunityOpened's


class DealChange(BaseModel):
    """What `customer_deals` reads of an opportunity event's v1 envelope."""

    event_type: str
    stream_id: uuid.UUID
    stream_version: int = Field(ge=1)
    data: _DealData


def customer_deals(pool: asyncpg.Pool, settings: Settings) -> BatchConsumer:
    """The consumer of `opportunity.events.v1` keeping `customer_deal`: which lead each deal was
    opened from, and whether it is open (SPEC §3: a lead is merged only into an open one)."""

    async def handle(batch: Batch) -> None:
        wanted = [r for r in records_of(batch) if header(r, HEADER_EVENT_TYPE) in OPEN_AFTER]
        deals: dict[uuid.UUID, tuple[uuid.UUID | None, bool, int]] = {}
        for record in wanted:
            try:  # only what this needs of the envelope: a fifth of reading all of it
                e = DealChange.model_validate_json(record.value or b"")
            except ValidationError as exc:
                log.error("skipping malformed event at %s/%s/%s: %s", record.topic,
                          record.partition, record.offset, str(exc)[:500])  # fmt: skip
                continue
            if e.event_type not in OPEN_AFTER:
                continue
            known, is_open, version = deals.get(e.stream_id, (None, True, 0))
            if e.stream_version > version:
                is_open, version = OPEN_AFTER[e.event_type], e.stream_version
            deals[e.stream_id] = (e.data.lead_id or known, is_open, version)
        if deals:
            # In the order of the key: replicas upserting the same deals take their locks alike.
            rows = sorted((deal, *state) for deal, state in deals.items())
            await pool.execute(UPSERT_DEALS, *columns(rows))

    # Fetches as large as reporting's: a few of its records matter, the rest is per-batch work
    # (the filter, the upsert, the commits) better shared by more of them.
    return BatchConsumer("customer-deals", settings, "capture-deals", [OPPORTUNITY_EVENTS],
                         handle, batch=settings.reporting_batch)  # fmt: skip
