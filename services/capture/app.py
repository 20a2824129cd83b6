"""Capture's use cases over its event store: web-form leads, and batches of partner messages
judged, deduped by message id, stored and answered in one transaction with their position."""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime

from eventsourcing.domain import Aggregate

from services.capture.domain import Incoming, Lead, PartnerMessage, Verdict, judge
from shared.bus.consumer import record_tracked
from shared.contracts.partner import DeadLetter, PartnerReply, ReplyStatus, WebFormLead
from shared.store.eventstore import EventStoreApp
from shared.store.migrations import BUS_TABLES, Migration

SCHEMA = "capture"
PARTNER_MESSAGE_NAMESPACE = uuid.UUID("0d7a3c61-52e4-4b8f-a0a3-9f1b6e2c8d47")
DEAD_LETTER_KEEP = 8 * 1024  # bytes of the raw value kept in a dead letter (with size and hash)

MIGRATIONS: list[Migration] = [
    BUS_TABLES,
    (
        2,
        """
        CREATE TABLE partners (
            partner_id text PRIMARY KEY,
            secret text NOT NULL,
            previous_secret text,
            previous_valid_until timestamptz,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        """,
    ),
]


class CaptureApp(EventStoreApp):
    name = "Capture"

    def capture_web_lead(self, form: WebFormLead, now: datetime, correlation_id: str) -> uuid.UUID:
        """Store a web-form lead; durable when this returns."""
        lead_id = uuid.uuid4()
        lead = Lead.capture(
            lead_id,
            form,
            source=form.channel.value,
            channel=form.channel.value,
            captured_at=now,
            correlation_id=correlation_id,
            causation_id=correlation_id,
        )
        self.record([lead])
        return lead_id

    def handle_partner_messages(
        self,
        tracking_name: str,
        messages: Sequence[Incoming],
        secrets_of: Mapping[str, list[str]],
        now: datetime,
        max_bytes: int,
    ) -> int:
        """Judge and answer a partition's batch of partner messages, exactly once each."""

        def decide(batch: list[Incoming]) -> list[Aggregate]:
            verdicts = [(m, judge(m, secrets_of, max_bytes)) for m in batch]
            candidates = [v.lead_id for _, v in verdicts if v.lead_id is not None]
            known = self.existing_ids(candidates)
            out: list[Aggregate] = []
            for message, verdict in verdicts:
                reply = verdict.reply
                if verdict.lead is not None and verdict.lead_id is not None:
                    if verdict.lead_id in known:
                        status = ReplyStatus.duplicate
                    else:
                        status = ReplyStatus.accepted
                        known.add(verdict.lead_id)
                        out.append(
                            Lead.capture(
                                verdict.lead_id,
                                verdict.lead,
                                source="partner",
                                captured_at=now,
                                correlation_id=verdict.lead.message_id,
                                causation_id=_position(message),
                                partner_id=verdict.partner_id,
                                message_id=verdict.message_id,
                            )
                        )
                    reply = PartnerReply(
                        message_id=verdict.lead.message_id, status=status, lead_id=verdict.lead_id
                    )
                out.append(_answer(tracking_name, message, verdict, reply, now))
            return out

        positioned = [(m.offset + 1, m) for m in messages]
        return record_tracked(self, tracking_name, positioned, decide)


def _position(message: Incoming) -> str:
    return f"{message.topic}/{message.partition}/{message.offset}"


def _answer(
    tracking_name: str,
    message: Incoming,
    verdict: Verdict,
    reply: PartnerReply | None,
    now: datetime,
) -> PartnerMessage:
    dead_letter = None
    if verdict.dead_letter_reason is not None:
        dead_letter = DeadLetter(
            source_topic=message.topic,
            source_partition=message.partition,
            source_offset=message.offset,
            reason=verdict.dead_letter_reason,
            partner_id=verdict.partner_id,
            message_id=verdict.message_id,
            errors=list(verdict.errors),
            received_at=now,
            value_bytes=len(message.value),
            value_sha256=hashlib.sha256(message.value).hexdigest(),
            value_b64=base64.b64encode(message.value[:DEAD_LETTER_KEEP]).decode(),
        ).model_dump(mode="json")
    correlation = verdict.message_id or _position(message)
    return PartnerMessage._create(
        PartnerMessage.Handled,
        # One answer per message: a replica replaying the same offsets collides here.
        id=uuid.uuid5(PARTNER_MESSAGE_NAMESPACE, f"{tracking_name}/{message.offset}"),
        timestamp=now,
        partner_id=verdict.partner_id if reply is not None else None,
        reply=None if reply is None else reply.model_dump(mode="json", exclude_none=True),
        dead_letter=dead_letter,
        correlation_id=correlation,
        causation_id=_position(message),
    )
