"""Capture's rules and aggregates, free of I/O: signature checks, the partner-message verdict,
and the Lead and PartnerMessage aggregates whose events the relay publishes."""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar

from eventsourcing.domain import Aggregate
from pydantic import ValidationError

from services.capture.normalize import match_keys
from shared.clock import utc_from_iso
from shared.contracts.events import (
    LeadCaptured,
    LeadForgotten,
    LeadMerged,
    LeadUnmerged,
    PartnerRegistered,
    RegistrationConflicted,
    RegistrationExpired,
    UnmergedLead,
)
from shared.contracts.partner import (
    HEADER_MESSAGE_ID,
    HEADER_PARTNER_ID,
    HEADER_SIGNATURE,
    MESSAGE_ID_MAX,
    PARTNER_ID_MAX,
    FieldError,
    LeadDetails,
    PartnerLeadMessage,
    PartnerReply,
    ReplyStatus,
    nul_errors,
)
from shared.domain import Published, PublishedCreated
from shared.privacy import seal

LEAD_NAMESPACE = uuid.UUID("a4b7c0e2-6a1f-4c55-8d0e-3c9f5f2a7b10")


def partner_lead_id(partner_id: str, message_id: str) -> uuid.UUID:
    """A partner's message id names one lead: the same message twice finds the same lead."""
    return uuid.uuid5(LEAD_NAMESPACE, f"{partner_id}\x1f{message_id}")


def sign(secret: str, value: bytes) -> str:
    """The `x-signature` header value: `sha256=<hex>` HMAC of the raw value bytes."""
    return "sha256=" + hmac.new(secret.encode(), value, hashlib.sha256).hexdigest()


def signature_valid(secrets: list[str], value: bytes, signature: str | None) -> bool:
    if not signature:
        return False
    # Hex in either case: `<hex>` says no case, and many HMAC libraries write upper case.
    given = signature.strip().lower().encode("utf-8", "replace")
    return any(hmac.compare_digest(sign(s, value).encode(), given) for s in secrets)


def partner_of(incoming: Incoming) -> str | None:
    """The partner a message names: its `x-partner-id` header, else its key."""
    return incoming.headers.get(HEADER_PARTNER_ID) or (
        incoming.key.decode("utf-8", "replace") if incoming.key else None
    )


def field_errors(exc: ValidationError) -> list[FieldError]:
    errors = []
    for error in exc.errors()[:50]:
        field = ".".join(str(p) for p in error["loc"])[:200] or "value"
        errors.append(FieldError(field=field, code=error["type"], message=error["msg"][:300]))
    return errors


class Lead(Aggregate):
    class Captured(PublishedCreated):
        public_name: ClassVar[str] = "LeadCaptured"

    class Forgotten(Published):
        public_name: ClassVar[str] = "LeadForgotten"

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Lead)
            aggregate.forgotten = True

    class Merged(Published):
        """Dedupe: this lead is a customer already known as another lead (`into_lead_id`)."""

        public_name: ClassVar[str] = "LeadMerged"

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Lead)
            aggregate.merged_into = uuid.UUID(self.payload["into_lead_id"])
            aggregate.merged_by = self.payload["rule"]

    class Unmerged(Published):
        """A merge undone: the lead is a customer of its own from now on."""

        public_name: ClassVar[str] = "LeadUnmerged"

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Lead)
            aggregate.merged_into = None

    def __init__(self, payload: dict[str, Any], correlation_id: str, causation_id: str) -> None:
        self.details = payload
        self.correlation_id = correlation_id
        self.merged_into: uuid.UUID | None = None
        self.merged_by: str | None = None  # the rule of the merge
        self.forgotten = False
        # Known only while the lead is being captured (the stored contact is sealed): the
        # contact's key, and the matching keys taken from the contact in clear.
        self.contact_key: bytes | None = None
        self.match_keys: list[tuple[str, str]] | None = None
        # The keys it is the first open customer's lead by, each with its claim's number.
        self.claims: dict[tuple[str, str], int] = {}
        # A partner's lead: the lead the partner was answered with (its own, or the lead of
        # the same customer the partner had given before).
        self.answered: uuid.UUID | None = None

    @classmethod
    def capture(
        cls,
        lead_id: uuid.UUID,
        details: LeadDetails,
        source: str,
        captured_at: datetime,
        correlation_id: str,
        causation_id: str,
        partner_id: str | None = None,
        message_id: str | None = None,
        channel: str | None = None,
        duplicate_of: Match | None = None,
        contact_key: bytes | None = None,
        *,
        keys: list[tuple[str, str]],
    ) -> Lead:
        """Capture a lead; one that matches a known customer (`duplicate_of`) is stored all the
        same and merged into it, naming the rule that matched. `keys`: its matching keys
        (`match_keys` of its details), which the caller looked the customer up by."""
        contract = LeadCaptured(
            # The details' own (validated) values: their addresses are not checked again.
            **{name: getattr(details, name) for name in LeadDetails.model_fields},
            lead_id=lead_id,
            source=source,
            channel=channel,
            partner_id=partner_id,
            message_id=message_id,
            captured_at=captured_at,
            duplicate_of=duplicate_of.lead_id if duplicate_of else None,
        )
        payload = contract.model_dump(mode="json")
        if contact_key is not None:  # stored sealed from the start: see shared.privacy
            payload["contact"] = seal(contact_key, payload["contact"])
        lead = cls._create(
            cls.Captured,
            id=lead_id,
            payload=payload,
            correlation_id=correlation_id,
            causation_id=causation_id,
            timestamp=captured_at,
        )
        if duplicate_of is not None:
            merged = LeadMerged(
                lead_id=lead_id,
                into_lead_id=duplicate_of.lead_id,
                rule=duplicate_of.rule,
                merged_at=captured_at,
            )
            lead.trigger_event(
                cls.Merged,
                payload=merged.model_dump(mode="json"),
                correlation_id=correlation_id,
                causation_id=causation_id,
                timestamp=captured_at,
            )
        lead.contact_key, lead.match_keys = contact_key, keys
        return lead

    def keys(self) -> list[tuple[str, str]]:
        if self.match_keys is not None:
            return self.match_keys
        contact, company = self.details["contact"], self.details["company"]
        return match_keys(
            contact.get("email"), contact.get("phone"), company.get("name"), company.get("region")
        )

    def unmerge(self, actor: str, at: datetime, note: str | None = None) -> None:
        """Undo the merge (SPEC §3): the lead opens a deal of its own. NotMerged if it is not
        merged (never was, or was unmerged before)."""
        if self.merged_into is None:
            raise NotMerged(f"lead {self.id} is not merged into another")
        facts = {k: v for k, v in self.details.items() if k not in ("contact", "duplicate_of")}
        unmerged = LeadUnmerged(
            lead_id=self.id,
            from_lead_id=self.merged_into,
            rule=self.merged_by or "",
            actor=actor,
            note=note,
            unmerged_at=at,
            lead=UnmergedLead.model_validate(facts),
        )
        self.trigger_event(self.Unmerged, payload=unmerged.model_dump(mode="json"),
                           correlation_id=f"unmerge:{self.id}", causation_id=str(self.id),
                           timestamp=at)  # fmt: skip

    def forget(self, at: datetime) -> None:
        """Erase the contact (the caller destroys its key in the same transaction)."""
        if self.forgotten:
            return
        forgotten = LeadForgotten(lead_id=self.id, forgotten_at=at)
        self.trigger_event(self.Forgotten, payload=forgotten.model_dump(mode="json"),
                           correlation_id=f"forget:{self.id}", causation_id=str(self.id),
                           timestamp=at)  # fmt: skip


class NotMerged(Exception):
    """An unmerge of a lead that is not merged."""


REGISTRATION_NAMESPACE = uuid.UUID("6a0f5b2e-93d4-4c1a-8f57-2b1e0c9d7a33")


class Registration(Aggregate):
    """Deal registration (报备): who holds a company, until when, and who was turned away."""

    class Registered(PublishedCreated):
        public_name: ClassVar[str] = "PartnerRegistered"

    class Changed(Published):
        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Registration)
            if self.public_name == "RegistrationExpired":
                aggregate.status = "expired"
            else:
                aggregate.conflicts += 1

    class Conflicted(Changed):
        public_name: ClassVar[str] = "RegistrationConflicted"

    class Expired(Changed):
        public_name: ClassVar[str] = "RegistrationExpired"

    def __init__(self, payload: dict[str, Any], correlation_id: str, causation_id: str) -> None:
        # The payload is a PartnerRegistered as `register` made it, checked in full then: read
        # as written, not validated again at every registration and every load.
        self.partner_id: str = payload["partner_id"]
        self.lead_id = uuid.UUID(payload["lead_id"])
        self.company_key: str = payload["company_key"]
        self.registered_at = utc_from_iso(payload["registered_at"])
        self.expires_at = utc_from_iso(payload["expires_at"])
        self.status = "held"
        self.conflicts = 0

    @classmethod
    def register(
        cls, partner_id: str, lead: LeadDetails, lead_id: uuid.UUID, company: str, at: datetime,
        days: int, correlation_id: str,
    ) -> Registration:  # fmt: skip
        registration_id = uuid.uuid5(REGISTRATION_NAMESPACE, f"{company}|{partner_id}|{at}")
        registered = PartnerRegistered(
            registration_id=registration_id, partner_id=partner_id, lead_id=lead_id,
            company=lead.company.name, region=lead.company.region, company_key=company,
            registered_at=at, expires_at=at + timedelta(days=days),
        )  # fmt: skip
        return cls._create(
            cls.Registered, id=registration_id, payload=registered.model_dump(mode="json"),
            correlation_id=correlation_id, causation_id=str(lead_id), timestamp=at,
        )  # fmt: skip

    def holds(self, at: datetime) -> bool:
        return self.status == "held" and at < self.expires_at

    def conflict(
        self, partner_id: str, lead_id: uuid.UUID, at: datetime, correlation_id: str
    ) -> None:
        conflicted = RegistrationConflicted(
            registration_id=self.id, partner_id=partner_id, lead_id=lead_id, at=at
        )
        self.trigger_event(
            self.Conflicted,
            payload=conflicted.model_dump(mode="json"),
            correlation_id=correlation_id,
            causation_id=str(lead_id),
            timestamp=at,
        )

    def expire(self, at: datetime) -> None:
        if self.status != "held" or at < self.expires_at:
            return
        expired = RegistrationExpired(registration_id=self.id, partner_id=self.partner_id,
                                      expired_at=self.expires_at)  # fmt: skip
        self.trigger_event(self.Expired, payload=expired.model_dump(mode="json"),
                           correlation_id=f"expiry:{at.isoformat()}", causation_id=str(self.id),
                           timestamp=at)  # fmt: skip


class PartnerMessage(Aggregate):
    """One message taken from `partner.leads.v1`, and what was answered: the reply to the
    partner, a dead letter, or both. The relay publishes both from the one stored event."""

    class Handled(Aggregate.Created):
        public_name: ClassVar[str] = "PartnerMessageHandled"
        partner_id: str | None
        reply: dict[str, Any] | None
        dead_letter: dict[str, Any] | None
        correlation_id: str
        causation_id: str

    def __init__(
        self,
        partner_id: str | None,
        reply: dict[str, Any] | None,
        dead_letter: dict[str, Any] | None,
        correlation_id: str,
        causation_id: str,
    ) -> None:
        self.partner_id = partner_id
        self.reply = reply
        self.dead_letter = dead_letter


@dataclass(frozen=True)
class Match:
    """A known customer a new lead matched: its first lead, who brought it, and by which rule."""

    lead_id: uuid.UUID
    partner_id: str | None
    rule: str


@dataclass(frozen=True)
class Incoming:
    """A raw partner message as the consumer saw it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: Mapping[str, str]


@dataclass(frozen=True)
class Verdict:
    """What to do with one partner message."""

    partner_id: str | None
    message_id: str | None
    reply: PartnerReply | None
    dead_letter_reason: str | None = None
    errors: tuple[FieldError, ...] = ()
    lead: PartnerLeadMessage | None = None
    lead_id: uuid.UUID | None = None

    @property
    def refused_on_secrets(self) -> bool:
        """Refused for its partner's secrets (unknown partner, bad signature): secrets read
        afresh may take it (a partner added, or a secret rotated, a moment ago)."""
        return self.dead_letter_reason in ("unknown_partner", "bad_signature")


def judge(
    incoming: Incoming,
    secrets_of: Mapping[str, list[str]],
    max_bytes: int,
) -> Verdict:
    """Check one partner message: who sent it, whether they signed it, whether it is a valid
    lead. The lead itself (new or duplicate) is decided by the caller against the store."""
    partner_id = partner_of(incoming)
    # What is answered or dead-lettered names the message by these headers, clipped: a header
    # has no size limit of its own, and one copied whole into a reply or dead letter (its key,
    # its value) can make a record the broker refuses, which would stop the relay at it.
    given_message_id = incoming.headers.get(HEADER_MESSAGE_ID)
    message_id = given_message_id[:MESSAGE_ID_MAX] if given_message_id else given_message_id
    named = partner_id[:PARTNER_ID_MAX] if partner_id else partner_id  # when not a partner's
    if len(incoming.value) > max_bytes:
        error = FieldError(field="value", code="too_large", message=f"over {max_bytes} bytes")
        known = partner_id is not None and partner_id in secrets_of
        reply = (
            PartnerReply(message_id=message_id or "", status=ReplyStatus.rejected, errors=[error])
            if known
            else None
        )
        return Verdict(partner_id if known else named, message_id, reply,
                       dead_letter_reason="too_large", errors=(error,))  # fmt: skip
    if not partner_id or partner_id not in secrets_of:
        return Verdict(named, message_id, None, dead_letter_reason="unknown_partner")

    def rejected(code: str, field: str, message: str, dead: str | None = None) -> Verdict:
        error = FieldError(field=field, code=code, message=message)
        reply = PartnerReply(
            message_id=message_id or "", status=ReplyStatus.rejected, errors=[error]
        )
        return Verdict(partner_id, message_id, reply, dead_letter_reason=dead, errors=(error,))

    if not signature_valid(
        secrets_of[partner_id], incoming.value, incoming.headers.get(HEADER_SIGNATURE)
    ):
        return rejected(
            "bad_signature",
            HEADER_SIGNATURE,
            "signature does not match the partner's secret",
            dead="bad_signature",
        )
    if not message_id:
        return rejected("missing", HEADER_MESSAGE_ID, "the x-message-id header is required")
    if given_message_id and len(given_message_id) > MESSAGE_ID_MAX:
        return rejected("too_long", HEADER_MESSAGE_ID, f"at most {MESSAGE_ID_MAX} characters")
    try:
        raw = json.loads(incoming.value)
    except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, absurd nesting or digits
        return rejected("invalid_json", "value", f"value is not JSON: {str(exc)[:200]}")
    errors = nul_errors(incoming.value, raw, "value")
    lead: PartnerLeadMessage | None = None
    try:
        if not errors:
            lead = PartnerLeadMessage.model_validate(raw)
    except ValidationError as exc:
        errors = field_errors(exc)
    except (ArithmeticError, ValueError, RecursionError) as exc:  # what slips past pydantic
        return rejected("invalid_value", "value", str(exc)[:200])
    if lead is None:
        reply = PartnerReply(message_id=message_id, status=ReplyStatus.rejected, errors=errors)
        return Verdict(partner_id, message_id, reply, errors=tuple(errors))
    mismatch = [
        FieldError(field=name, code="header_mismatch", message=f"must equal the {header} header")
        for name, header, value in (
            ("partner_id", HEADER_PARTNER_ID, partner_id),
            ("message_id", HEADER_MESSAGE_ID, message_id),
        )
        if getattr(lead, name) != value
    ]
    if mismatch:
        reply = PartnerReply(message_id=message_id, status=ReplyStatus.rejected, errors=mismatch)
        return Verdict(partner_id, message_id, reply, errors=tuple(mismatch))
    return Verdict(
        partner_id, message_id, None, lead=lead, lead_id=partner_lead_id(partner_id, message_id)
    )
