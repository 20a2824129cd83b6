"""Capture's verdict on partner messages: every input gets a reply or a dead letter, never an
exception (SPEC §3)."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from services.capture.domain import Incoming, judge, partner_lead_id, sign
from shared.contracts.partner import ReplyStatus, nul_errors
from tests.support import lead_value

SECRETS = {"acme": ["s3cret"], "globex": ["new", "old"]}
MAX = 64 * 1024


def message(value: bytes, headers: dict[str, str], key: bytes | None = b"acme") -> Incoming:
    return Incoming("partner.leads.v1", 0, 7, key, value, headers)


def signed(partner: str, message_id: str, value: bytes, secret: str = "s3cret") -> Incoming:
    return message(
        value,
        {"x-partner-id": partner, "x-message-id": message_id, "x-signature": sign(secret, value)},
        partner.encode(),
    )


def test_a_valid_signed_message_is_a_lead_with_an_id_from_its_message_id() -> None:
    verdict = judge(signed("acme", "acme-1", lead_value("acme", "acme-1")), SECRETS, MAX)
    assert verdict.lead is not None and verdict.reply is None
    assert verdict.lead_id == partner_lead_id("acme", "acme-1")
    assert partner_lead_id("acme", "acme-1") != partner_lead_id("globex", "acme-1")


def test_either_secret_of_a_rotated_partner_is_accepted() -> None:
    value = lead_value("globex", "g-1")
    assert judge(signed("globex", "g-1", value, "old"), SECRETS, MAX).lead is not None
    assert judge(signed("globex", "g-1", value, "new"), SECRETS, MAX).lead is not None


def test_bad_signature_is_rejected_and_dead_lettered() -> None:
    verdict = judge(signed("acme", "acme-2", lead_value("acme", "acme-2"), "wrong"), SECRETS, MAX)
    assert verdict.lead is None
    assert verdict.reply is not None and verdict.reply.status is ReplyStatus.rejected
    assert verdict.reply.errors and verdict.reply.errors[0].code == "bad_signature"
    assert verdict.dead_letter_reason == "bad_signature"


def test_unknown_partner_gets_a_dead_letter_and_no_reply() -> None:
    verdict = judge(signed("initech", "i-1", lead_value("initech", "i-1")), SECRETS, MAX)
    assert verdict.reply is None and verdict.dead_letter_reason == "unknown_partner"


def test_non_json_and_oversized_are_rejected_with_the_field() -> None:
    not_json = judge(signed("acme", "acme-3", b"\xff{not json"), SECRETS, MAX)
    assert not_json.reply is not None and not_json.reply.errors
    assert not_json.reply.errors[0].code == "invalid_json"
    big = lead_value("acme", "acme-4", need="x" * (MAX + 1))
    oversized = judge(signed("acme", "acme-4", big), SECRETS, MAX)
    assert oversized.reply is not None and oversized.reply.errors
    assert oversized.reply.errors[0].code == "too_large"


def test_schema_errors_are_reported_field_by_field() -> None:
    body = json.loads(lead_value("acme", "acme-5"))
    body["contact"]["email"] = "not-an-email"
    body["budget"] = {"amount": 12.5, "currency": "yuan"}
    verdict = judge(signed("acme", "acme-5", json.dumps(body).encode()), SECRETS, MAX)
    assert verdict.reply is not None and verdict.reply.status is ReplyStatus.rejected
    fields = {e.field for e in verdict.reply.errors or []}
    assert {"contact.email", "budget.currency"} <= fields


def test_a_partner_cannot_submit_in_another_partners_name() -> None:
    value = lead_value("globex", "acme-6")  # body says globex, signed and sent by acme
    verdict = judge(signed("acme", "acme-6", value), SECRETS, MAX)
    assert verdict.lead is None and verdict.reply is not None
    assert [e.field for e in verdict.reply.errors or []] == ["partner_id"]


@settings(max_examples=300, deadline=None)
@given(
    value=st.binary(max_size=2048),
    partner=st.sampled_from(["acme", "globex", "nobody", ""]),
    message_id=st.text(max_size=20),
    signature=st.one_of(st.none(), st.text(max_size=80)),
    key=st.one_of(st.none(), st.binary(max_size=20)),
)
def test_hostile_input_always_gets_an_answer(
    value: bytes, partner: str, message_id: str, signature: str | None, key: bytes | None
) -> None:
    headers = {"x-partner-id": partner, "x-message-id": message_id}
    if signature is not None:
        headers["x-signature"] = signature
    verdict = judge(message(value, headers, key), SECRETS, MAX)
    assert (
        (verdict.reply is not None)
        or (verdict.dead_letter_reason is not None)
        or (verdict.lead is not None)
    )


@settings(max_examples=100, deadline=None)
@given(
    body=st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=30),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_any_signed_json_gets_an_answer(body: object) -> None:
    value = json.dumps(body).encode()
    verdict = judge(signed("acme", "acme-h", value), SECRETS, MAX)
    assert verdict.reply is not None or verdict.lead is not None


def test_inputs_that_slip_past_parsers_are_rejected_not_raised() -> None:
    deep = signed("acme", "acme-d", b"[" * 3000)
    assert judge(deep, SECRETS, MAX).reply.errors[0].code == "invalid_json"  # type: ignore[union-attr]
    digits = signed("acme", "acme-n", b"1" * 5000)
    assert judge(digits, SECRETS, MAX).reply.errors[0].code == "invalid_json"  # type: ignore[union-attr]
    for field, value in (
        ("budget", {"amount": "1e30", "currency": "CNY"}),
        ("submitted_at", "9999-12-31T23:59:59-01:00"),
    ):
        body = json.loads(lead_value("acme", "acme-x"))
        body[field] = value
        verdict = judge(signed("acme", "acme-x", json.dumps(body).encode()), SECRETS, MAX)
        assert verdict.reply is not None and verdict.reply.status is ReplyStatus.rejected
        assert verdict.reply.errors and verdict.reply.errors[0].field.startswith(field)


def test_oversized_is_checked_before_anything_else() -> None:
    huge = b"x" * (MAX + 1)
    stranger = message(huge, {"x-partner-id": "initech", "x-message-id": "i-9"}, b"initech")
    verdict = judge(stranger, SECRETS, MAX)
    assert verdict.reply is None and verdict.dead_letter_reason == "too_large"


def test_header_without_a_value_does_not_break_intake() -> None:
    from aiokafka.structs import ConsumerRecord

    from services.capture.bus import incoming

    record = ConsumerRecord(
        "partner.leads.v1",
        0,
        5,
        0,
        0,
        b"acme",
        b"{}",
        None,
        2,
        2,
        [("x-partner-id", None), ("x-message-id", b"m")],
    )
    seen = incoming(record)  # type: ignore[arg-type]
    assert seen.headers == {"x-partner-id": "", "x-message-id": "m"}
    assert judge(seen, SECRETS, MAX).reply is not None  # known by key, unsigned: rejected


def test_normalised_keys() -> None:
    from services.capture.normalize import company_key, email_key, phone_e164

    assert email_key("  Li.Wei@Example.CN ") == "li.wei@example.cn"
    assert {phone_e164(p) for p in ("+86 138 0000 0000", "138-0000-0000", "0086 13800000000",
                                      "8613800000000")} == {"+8613800000000"}  # fmt: skip
    assert phone_e164("+1 (415) 555-0100") == "+14155550100"
    assert phone_e164("6655 1234") is None  # a local number: no country to place it in
    assert company_key("Shaanxi Northwind Logistics Co., Ltd.", "cn-sn") == company_key(
        "SHAANXI  NORTHWIND LOGISTICS", "CN-SN"
    )
    assert company_key("陕西北风物流有限公司", "CN-SN") == company_key("陕西北风物流", "CN-SN")
    assert company_key("Northwind", "CN-SN") != company_key("Northwind", "CN-BJ")
    assert company_key("Zinc", "CN") != company_key("Z Inc", "CN")
    assert company_key("Mexico Ltd", "CN") == "CN|mexico"


def test_a_nul_character_anywhere_is_rejected_with_its_field() -> None:
    value = lead_value("acme", "acme-9", company="Nul\x00 Co")
    verdict = judge(signed("acme", "acme-9", value), SECRETS, MAX)
    assert verdict.lead is None
    assert verdict.reply is not None and verdict.reply.status is ReplyStatus.rejected
    assert [(e.field, e.code) for e in verdict.reply.errors] == [
        ("company.name", "invalid_character")
    ]


def test_a_nul_character_is_found_whatever_the_encoding_hides_it_behind() -> None:
    """JSON in UTF-16 or UTF-32 (which `json.loads` reads from bytes) writes the escape \\u0000
    with zero bytes between its characters, and a form may carry a raw NUL byte."""
    body = json.loads(lead_value("acme", "acme-9"))
    body["company"]["region"] = "CN-SN\x00"
    for encoding in ("utf-16", "utf-32"):
        value = json.dumps(body).encode(encoding)
        verdict = judge(signed("acme", "acme-9", value), SECRETS, MAX)
        assert verdict.lead is None and verdict.reply is not None
        assert [(e.field, e.code) for e in verdict.reply.errors] == [
            ("company.region", "invalid_character")
        ]
    form = b"company.region=CN\x00SN"
    assert [e.field for e in nul_errors(form, dict(parse_qsl(form.decode())), "body")] == [
        "company.region"
    ]


def test_json_nested_as_deep_as_the_parser_takes_with_a_nul_gets_a_reply() -> None:
    """The NUL walk goes as deep as the JSON: a walk by recursion stopped at about 490 levels,
    with RecursionError, which no caller expected, and the partition stopped at the message."""
    for depth in (300, 600, 950):
        body = '{"message_id":"acme-d","partner_id":"acme","need":"\\u0000","x":'
        value = (body + "[" * depth + "]" * depth + "}").encode()
        verdict = judge(signed("acme", "acme-d", value), SECRETS, MAX)
        assert verdict.reply is not None and verdict.reply.status is ReplyStatus.rejected
        assert ("need", "invalid_character") in [(e.field, e.code) for e in verdict.reply.errors]


def test_a_lone_surrogate_in_a_key_is_named_in_an_error_any_store_can_write() -> None:
    value = b'{"message_id":"acme-s","partner_id":"acme","need":{"\\ud800":"\\u0000"}}'
    verdict = judge(signed("acme", "acme-s", value), SECRETS, MAX)
    assert verdict.reply is not None
    assert [e.field for e in verdict.reply.errors] == ["need.\\ud800"]
    orjson.dumps(verdict.reply.model_dump(mode="json"))  # raised on the surrogate before


def test_headers_copied_into_answers_are_clipped() -> None:
    """A header has no size limit of its own: copied whole into a reply or dead letter, it made
    records the broker refuses (over 1 MB), which stopped capture's relay at them."""
    value = lead_value("acme", "acme-long")
    long_id = "m" * 560_000
    too_long = judge(signed("acme", long_id, value), SECRETS, MAX)
    assert too_long.reply is not None and too_long.reply.status is ReplyStatus.rejected
    assert too_long.reply.message_id == long_id[:128] and too_long.lead is None
    assert [(e.field, e.code) for e in too_long.reply.errors] == [("x-message-id", "too_long")]
    unsigned = judge(message(value, {"x-partner-id": "acme", "x-message-id": long_id}),
                     SECRETS, MAX)  # fmt: skip
    assert unsigned.reply is not None and len(unsigned.reply.message_id) == 128
    stranger = judge(message(value, {"x-partner-id": "x" * 360_000, "x-message-id": long_id}),
                     SECRETS, MAX)  # fmt: skip
    assert stranger.dead_letter_reason == "unknown_partner"
    assert (len(stranger.partner_id or ""), len(stranger.message_id or "")) == (64, 128)


def test_an_expected_close_past_2100_is_a_field_error() -> None:
    value = lead_value("acme", "acme-far", expected_close="9999-12-31")
    verdict = judge(signed("acme", "acme-far", value), SECRETS, MAX)
    assert verdict.reply is not None and verdict.lead is None
    assert [e.field for e in verdict.reply.errors] == ["expected_close"]
    accepted = judge(signed("acme", "acme-near", lead_value("acme", "acme-near",
                     expected_close="2100-12-31")), SECRETS, MAX)  # fmt: skip
    assert accepted.lead is not None


def test_the_relays_route_from_the_stored_events_writes_what_the_revived_event_would() -> None:
    """`route.stored` writes replies, dead letters, merges and registrations from the stored
    JSON; it is exactly what the general path writes, and a captured lead (its contact sealed in
    the store) goes the general way."""
    import uuid
    from datetime import UTC, datetime

    from eventsourcing.persistence import Mapper, Notification

    from services.capture.app import CaptureApp
    from services.capture.bus import route
    from services.capture.domain import Lead, Match, PartnerMessage, Registration
    from services.capture.normalize import match_keys
    from shared.privacy import new_key

    at = datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=UTC)
    verdict = judge(signed("acme", "acme-9", lead_value("acme", "acme-9")), SECRETS, MAX)
    assert verdict.lead is not None and verdict.lead_id is not None
    first = uuid.uuid4()
    contact, company = verdict.lead.contact, verdict.lead.company
    lead = Lead.capture(
        verdict.lead_id,
        verdict.lead,
        source="partner",
        captured_at=at,
        correlation_id="acme-9",
        causation_id="partner.leads.v1/0/9",
        partner_id="acme",
        message_id="acme-9",
        duplicate_of=Match(first, "acme", "email"),
        contact_key=new_key(),
        keys=match_keys(contact.email, contact.phone, company.name, company.region),
    )
    registration = Registration.register(
        "acme", verdict.lead, verdict.lead_id, "northwind|cn", at, 90, "acme-9"
    )
    registration.conflict("globex", uuid.uuid4(), at, "g-1")
    registration.expire(datetime(2027, 3, 1, tzinfo=UTC))
    accepted = {
        "message_id": "acme-9",
        "status": "accepted",
        "lead_id": str(first),
        "n": "北 \u2028",
    }
    rejected = {"message_id": "m", "status": "rejected", "errors": [{"field": "x", "code": "y"}]}
    answers = [
        ("acme", accepted, None),
        ("acme", rejected, {"reason": "bad", "partner_id": "acme", "value_bytes": 3}),
        (None, None, {"reason": "unknown_partner", "partner_id": None}),
    ]
    handled = [
        PartnerMessage._create(
            PartnerMessage.Handled,
            id=uuid.uuid4(),
            timestamp=at,
            partner_id=partner,
            reply=reply,
            dead_letter=letter,
            correlation_id="acme-9",
            causation_id="p/0/9",
        )
        for partner, reply, letter in answers
    ]
    mapper = Mapper(transcoder=CaptureApp.construct_transcoder(CaptureApp.__new__(CaptureApp)))
    events = [*lead.collect_events(), *registration.collect_events()]
    events += [e for message in handled for e in message.collect_events()]
    published = 0
    for n, event in enumerate(events, start=1):
        stored = mapper.to_stored_event(event)
        notification = Notification(
            id=n,
            originator_id=stored.originator_id,
            originator_version=stored.originator_version,
            topic=stored.topic,
            state=stored.state,
        )
        fast = route.stored(notification)
        if isinstance(event, Lead.Captured):
            assert fast is None
            continue
        assert fast == route(event, notification)
        published += len(fast or [])
    assert published == 1 + 3 + 1 + 2 + 1  # merged; registered, conflicted, expired; answers


def test_a_registered_payload_is_read_as_its_contract_reads_it() -> None:
    """Registration reads its payload without validating it again: the values and types the
    contract gives; a time without a zone is refused."""
    import uuid
    from datetime import UTC, datetime

    import pytest

    from services.capture.domain import Registration
    from shared.contracts.events import PartnerRegistered

    verdict = judge(signed("acme", "acme-5", lead_value("acme", "acme-5")), SECRETS, MAX)
    assert verdict.lead is not None and verdict.lead_id is not None
    at = datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=UTC)
    registration = Registration.register("acme", verdict.lead, verdict.lead_id, "n|cn", at, 90, "m")
    payload = registration.pending_events[0].payload  # type: ignore[attr-defined]
    contract = PartnerRegistered.model_validate(payload)
    for name in ("partner_id", "lead_id", "company_key", "registered_at", "expires_at"):
        assert getattr(registration, name) == getattr(contract, name), name
        assert type(getattr(registration, name)) is type(getattr(contract, name)), name
    assert registration.expires_at.tzinfo is UTC
    zoneless = {**payload, "expires_at": "2027-01-01T00:00:00"}
    with pytest.raises(ValueError, match="zone"):
        Registration._create(Registration.Registered, id=uuid.uuid4(), payload=zoneless,
                             correlation_id="m", causation_id="c", timestamp=at)  # fmt: skip
