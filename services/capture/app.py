"""Capture's use cases over its event store: web-form leads, and batches of partner messages
judged, deduped, stored and answered in one transaction with their position. The customer keys
(e-mail, phone, company in region) that dedupe matches on are written with the leads."""

from __future__ import annotations

import base64
import hashlib
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime

from eventsourcing.domain import Aggregate
from psycopg.sql import SQL

from services.capture.domain import Incoming, Lead, Match, PartnerMessage, Verdict, judge
from services.capture.normalize import match_keys
from shared.bus.consumer import record_tracked
from shared.contracts.partner import DeadLetter, PartnerReply, ReplyStatus, WebFormLead
from shared.store.eventstore import EventStoreApp
from shared.store.migrations import BUS_TABLES, Migration
from shared.store.recorder import SideWrite

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
    (
        3,
        """
        CREATE TABLE lead_key (
            rule text NOT NULL,
            key text NOT NULL,
            lead_id uuid NOT NULL,
            partner_id text,
            captured_at timestamptz NOT NULL,
            PRIMARY KEY (rule, key, lead_id)
        );
        """,
    ),
]


class CaptureApp(EventStoreApp):
    name = "Capture"

    def capture_web_lead(self, form: WebFormLead, now: datetime, correlation_id: str) -> uuid.UUID:
        """Store a web-form lead (merged into a known customer it matches); durable when this
        returns."""
        lead_id = uuid.uuid4()
        keys = match_keys(form.contact.email, form.contact.phone, form.company.name,
                          form.company.region)  # fmt: skip
        lead = Lead.capture(
            lead_id,
            form,
            source=form.channel.value,
            channel=form.channel.value,
            captured_at=now,
            correlation_id=correlation_id,
            causation_id=correlation_id,
            duplicate_of=first_match(keys, self.known_customers(keys)),
        )
        self.record([lead], side_writes=self.key_writes([lead]))
        return lead_id

    def known_customers(self, keys: Sequence[tuple[str, str]]) -> dict[tuple[str, str], Match]:
        """The first lead each key belongs to: one query for a whole batch."""
        if not keys:
            return {}
        rows = self.query(
            SQL(
                "SELECT DISTINCT ON (rule, key) rule, key, lead_id, partner_id FROM {}"
                " WHERE rule || ':' || key = ANY(%s) ORDER BY rule, key, captured_at, lead_id"
            ).format(self.table("lead_key")),
            [[f"{rule}:{key}" for rule, key in keys]],
        )
        return {
            (r["rule"], r["key"]): Match(uuid.UUID(str(r["lead_id"])), r["partner_id"], r["rule"])
            for r in rows
        }

    def key_writes(self, aggregates: Sequence[Aggregate]) -> list[SideWrite]:
        """Index new leads by their keys; a merged lead's keys lead to the customer's first lead
        (so a later match finds the customer, not a chain of duplicates)."""
        rows = []
        for lead in aggregates:
            if isinstance(lead, Lead):
                root = lead.merged_into or lead.id
                partner = lead.details.get("partner_id")
                at = lead.details["captured_at"]
                rows += [(rule, key, root, partner, at) for rule, key in lead.keys()]
        statement = SQL(
            "INSERT INTO {} (rule, key, lead_id, partner_id, captured_at)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
        ).format(self.table("lead_key"))
        return [(statement, rows)]

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
            keys_of = {
                v.lead_id: match_keys(v.lead.contact.email, v.lead.contact.phone,
                                      v.lead.company.name, v.lead.company.region)
                for _, v in verdicts
                if v.lead is not None and v.lead_id is not None
            }  # fmt: skip
            customers = self.known_customers(sorted({k for keys in keys_of.values() for k in keys}))
            out: list[Aggregate] = []
            for message, verdict in verdicts:
                reply = verdict.reply
                if verdict.lead is not None and verdict.lead_id is not None:
                    lead_id, status = verdict.lead_id, ReplyStatus.accepted
                    if lead_id in known:  # the same message again
                        status = ReplyStatus.duplicate
                    else:
                        known.add(lead_id)
                        match = first_match(keys_of[lead_id], customers)
                        lead = Lead.capture(
                            lead_id,
                            verdict.lead,
                            source="partner",
                            captured_at=now,
                            correlation_id=verdict.lead.message_id,
                            causation_id=_position(message),
                            partner_id=verdict.partner_id,
                            message_id=verdict.message_id,
                            duplicate_of=match,
                        )
                        out.append(lead)
                        if match is not None and match.partner_id == verdict.partner_id:
                            # The same lead from the same partner: stored, merged, and answered
                            # with the lead the partner already has.
                            lead_id, status = match.lead_id, ReplyStatus.duplicate
                        root = Match(lead.merged_into or lead.id, verdict.partner_id, "")
                        for key in keys_of[verdict.lead_id]:  # later leads in this batch see it
                            customers.setdefault(key, Match(root.lead_id, root.partner_id, key[0]))
                    reply = PartnerReply(
                        message_id=verdict.lead.message_id, status=status, lead_id=lead_id
                    )
                out.append(_answer(tracking_name, message, verdict, reply, now))
            return out

        positioned = [(m.offset + 1, m) for m in messages]
        return record_tracked(self, tracking_name, positioned, decide, self.key_writes)


def first_match(
    keys: Sequence[tuple[str, str]], customers: Mapping[tuple[str, str], Match]
) -> Match | None:
    """The first rule (e-mail, phone, company in region) that finds a known customer."""
    for key in keys:
        if key in customers:
            return customers[key]
    return None


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
