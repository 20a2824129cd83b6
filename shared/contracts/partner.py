"""Partner intake (SPEC §3): the lead message partners sign and send, and the replies."""

from __future__ import annotations

import re
import uuid
from datetime import date
from enum import StrEnum
from typing import Annotated, Any, Literal

from email_validator import SPECIAL_USE_DOMAIN_NAMES
from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES
from pydantic import AfterValidator, Field, ValidationInfo, WithJsonSchema
from pydantic.networks import validate_email
from pydantic_core import PydanticCustomError

from shared.contracts.common import FROM_BUS, NUL_MESSAGE, Contract, Money, UtcTime, nul_paths

HEADER_PARTNER_ID = "x-partner-id"
HEADER_MESSAGE_ID = "x-message-id"
HEADER_SIGNATURE = "x-signature"


# Addresses of the everyday shape: a dot-atom of letters, digits and `_+-`, at plain LDH labels
# under a letters-only top-level domain. email_validator accepts every one of them that is not
# too long, has no `--` (IDNA), is not under a special-use name and is not a role mailbox
# (`info@`, lowercased whole), and normalises it by lowercasing the domain: known here in
# ~1 µs instead of its ~35 µs. A property test holds the two equal.
_PLAIN_EMAIL = re.compile(
    r"([A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*)"
    r"@((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,63}))"
)
SPECIAL_USE_DOMAINS = frozenset(SPECIAL_USE_DOMAIN_NAMES)


def plain_email(value: str) -> str | None:
    """The address as email_validator would normalise it, for an address of the everyday shape;
    None for any other (those go to email_validator itself)."""
    if len(value) > 254 or (match := _PLAIN_EMAIL.fullmatch(value)) is None:
        return None
    local, domain, top = match.groups()
    if len(local) > 64 or len(domain) > 253 or "--" in domain:
        return None
    if top.lower() in SPECIAL_USE_DOMAINS or local.lower() in CASE_INSENSITIVE_MAILBOX_NAMES:
        return None  # special-use; or a role mailbox (info@, sales@), which it lowercases
    return f"{local}@{domain.lower()}"


INVALID_EMAIL = "invalid_email"  # the field error's code (SPEC §3's reply example)


def _email(value: str, info: ValidationInfo) -> str:
    """pydantic's EmailStr check (same errors, same normalised address) for an address from
    outside (a partner's message, a web form): about 35 µs, the costliest check of a lead, but
    for the everyday shape (`plain_email`, ~1 µs). One read off the bus was checked so by capture
    before it was stored: the services reading it check only its shape."""
    if info.context and info.context.get(FROM_BUS):
        if "@" not in value or len(value) > 254 or any(c.isspace() for c in value):
            raise PydanticCustomError(INVALID_EMAIL, "value is not a valid email address")
        return value
    try:
        return plain_email(value) or validate_email(value)[1]
    except PydanticCustomError as exc:  # pydantic's own says `value_error`, like any bad value
        raise PydanticCustomError(INVALID_EMAIL, "{reason}", {"reason": str(exc)}) from None


Email = Annotated[
    str, AfterValidator(_email), WithJsonSchema({"type": "string", "format": "email"})
]


class Authority(StrEnum):
    decision_maker = "decision_maker"
    influencer = "influencer"
    user = "user"
    unknown = "unknown"


class Timeline(StrEnum):
    this_month = "this_month"
    this_quarter = "this_quarter"
    this_year = "this_year"
    unknown = "unknown"


class Company(Contract):
    name: str = Field(min_length=1, max_length=200)
    industry: str | None = Field(default=None, max_length=100)
    region: str | None = Field(default=None, max_length=20)
    size: str | None = Field(default=None, max_length=20)


class Contact(Contract):
    name: str = Field(min_length=1, max_length=100)
    email: Email | None = None
    phone: str | None = Field(default=None, max_length=40)
    title: str | None = Field(default=None, max_length=100)


LAST_CLOSE = date(2100, 12, 31)
MESSAGE_ID_MAX, PARTNER_ID_MAX = 128, 64  # characters


def _close_by(day: date, info: ValidationInfo) -> date:
    """A deal expected to close within reach (reminders are scheduled from the day after), as
    capture takes it in. One read off the bus passes as stored: it was taken in before."""
    if day > LAST_CLOSE and not (info.context and info.context.get(FROM_BUS)):
        raise ValueError(f"expected_close must be on or before {LAST_CLOSE.isoformat()}")
    return day


class LeadDetails(Contract):
    """What every lead carries, from a partner or from a web form."""

    company: Company
    contact: Contact
    need: str | None = Field(default=None, max_length=2000)
    budget: Money | None = None
    authority: Authority = Authority.unknown
    timeline: Timeline = Timeline.unknown
    expected_close: Annotated[date, AfterValidator(_close_by)] | None = None
    source_detail: str | None = Field(default=None, max_length=500)


class PartnerLeadMessage(LeadDetails):
    """The value of a message on `partner.leads.v1`."""

    message_id: str = Field(min_length=1, max_length=MESSAGE_ID_MAX)
    partner_id: str = Field(min_length=1, max_length=PARTNER_ID_MAX)
    submitted_at: UtcTime


class Channel(StrEnum):
    web_form = "web_form"
    social = "social"
    event = "event"
    referral = "referral"
    sales_self = "sales_self"


class WebFormLead(LeadDetails):
    """The body of `POST /v1/leads`."""

    channel: Channel = Channel.web_form


def _encodable(text: str) -> str:
    """Text as UTF-8 can carry it: an error names what it was given, and a JSON key or message
    can hold a lone surrogate (`\\ud800`), which no reply, log or store could write."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


Encodable = Annotated[str, AfterValidator(_encodable)]


class FieldError(Contract):
    field: Encodable
    code: Encodable
    message: Encodable


def nul_errors(raw: bytes, parsed: Any, whole: str) -> list[FieldError]:
    """A field error for each place a NUL character is in a partner message or web form
    (`parsed` from `raw`; `whole`: the field named when the top level is the place). JSON holds
    a NUL only as the escape \\u0000 and a form only as %00, unless a zero byte is in it (a raw
    NUL, or JSON in UTF-16 or UTF-32, which writes the escape with zero bytes between its
    characters): a message with none of them, nearly every one, is passed by one scan of its
    bytes, without walking what was parsed."""
    if b"\\u0000" not in raw and b"%00" not in raw and b"\x00" not in raw:
        return []
    return [
        FieldError(field=".".join(map(str, path)) or whole, code="invalid_character",
                   message=NUL_MESSAGE)
        for path in nul_paths(parsed)
    ]  # fmt: skip


class RegistrationStatus(StrEnum):
    registered = "registered"
    held_by_other_partner = "held_by_other_partner"


class Registration(Contract):
    status: RegistrationStatus
    registered_at: UtcTime | None = None
    expires_at: UtcTime | None = None


class ReplyStatus(StrEnum):
    accepted = "accepted"
    duplicate = "duplicate"
    conflict = "conflict"
    rejected = "rejected"


class PartnerReply(Contract):
    """The value of a message on `partner.<partner_id>.replies.v1`; key = message_id."""

    message_id: str
    status: ReplyStatus
    lead_id: uuid.UUID | None = None
    registration: Registration | None = None
    errors: list[FieldError] | None = None


class DeadLetter(Contract):
    """The value of a message on `dead-letter.v1`: what could not be processed, and why."""

    source_topic: str
    source_partition: int
    source_offset: int
    reason: str
    partner_id: str | None = None
    message_id: str | None = None
    errors: list[FieldError] = Field(default_factory=list)
    received_at: UtcTime
    value_bytes: int | None = None
    value_sha256: str | None = None
    value_b64: str | None = None  # the first 8 KiB of the raw value
    kind: Literal["dead_letter"] = "dead_letter"
