"""The public contracts: envelope, money, partner message and replies (SPEC §2, §3)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import AfterValidator, TypeAdapter, ValidationError

from shared.contracts import Envelope, Money, PartnerLeadMessage, PartnerReply, event_id_for
from shared.contracts.common import UtcTime, _utc
from shared.contracts.topics import CORE_TOPICS, partner_replies
from shared.settings import Rules


def test_money_is_a_decimal_string_never_a_float() -> None:
    money = Money(amount=Decimal("120000"), currency="CNY")
    assert money.model_dump(mode="json") == {"amount": "120000.00", "currency": "CNY"}
    with pytest.raises(ValidationError):
        Money(amount=Decimal("1.005"), currency="CNY")
    with pytest.raises(ValidationError):
        Money(amount=Decimal("-1"), currency="CNY")
    with pytest.raises(ValidationError):
        Money.model_validate({"amount": "NaN", "currency": "CNY"})
    # Not negative, and not written so: "-0.00" breaks the published schema's pattern.
    zero = Money.model_validate({"amount": "-0", "currency": "CNY"})
    assert zero.model_dump(mode="json")["amount"] == "0.00"


def test_envelope_times_are_utc_with_z_and_event_ids_are_stable() -> None:
    stream = uuid.uuid4()
    envelope = Envelope(
        event_id=event_id_for(stream, 4),
        event_type="OpportunityStageChanged",
        schema_version=1,
        stream_id=stream,
        stream_version=4,
        occurred_at=datetime(2026, 11, 22, 18, 0, tzinfo=UTC),
        correlation_id="c",
        causation_id="x",
        data={},
    )
    dumped = envelope.model_dump(mode="json")
    assert dumped["occurred_at"] == "2026-11-22T18:00:00Z"
    assert event_id_for(stream, 4) == envelope.event_id != event_id_for(stream, 5)
    with pytest.raises(ValidationError):
        Envelope.model_validate({**dumped, "occurred_at": "2026-11-22T18:00:00"})
    with pytest.raises(ValidationError):
        Envelope.model_validate({**dumped, "stream_version": 0})


def test_partner_message_of_the_spec_parses() -> None:
    message = PartnerLeadMessage.model_validate(
        {
            "message_id": "acme-000123",
            "partner_id": "acme",
            "submitted_at": "2026-11-22T09:00:00Z",
            "company": {
                "name": "Shaanxi Northwind Logistics",
                "industry": "logistics",
                "region": "CN-SN",
                "size": "200-999",
            },
            "contact": {
                "name": "Li Wei",
                "email": "li.wei@example.cn",
                "phone": "+86 138 0000 0000",
                "title": "CIO",
            },
            "need": "dedicated line for 12 branches",
            "budget": {"amount": "350000.00", "currency": "CNY"},
            "authority": "decision_maker",
            "timeline": "this_quarter",
            "expected_close": "2027-01-31",
            "source_detail": "trade show Xi'an 2026",
        }
    )
    assert message.budget is not None and message.budget.amount == Decimal("350000.00")


def test_unknown_fields_are_refused_in_partner_messages() -> None:
    with pytest.raises(ValidationError) as error:
        PartnerLeadMessage.model_validate(
            {
                "message_id": "m",
                "partner_id": "acme",
                "submitted_at": "2026-11-22T09:00:00Z",
                "company": {"name": "X"},
                "contact": {"name": "Y"},
                "surprise": 1,
            }
        )
    assert error.value.errors()[0]["loc"] == ("surprise",)


def test_reply_shapes_of_the_spec() -> None:
    lead = uuid.uuid4()
    reply = PartnerReply.model_validate(
        {"message_id": "acme-1", "status": "duplicate", "lead_id": str(lead)}
    )
    assert reply.model_dump(mode="json", exclude_none=True) == {
        "message_id": "acme-1",
        "status": "duplicate",
        "lead_id": str(lead),
    }


def test_topic_names() -> None:
    assert set(CORE_TOPICS) == {
        "partner.leads.v1",
        "lead.events.v1",
        "opportunity.events.v1",
        "notification.events.v1",
        "dead-letter.v1",
    }
    assert partner_replies("acme") == "partner.acme.replies.v1"
    with pytest.raises(ValueError):
        partner_replies("../evil")


def test_the_relays_fast_envelope_is_the_contract_envelope() -> None:
    from services.pipeline.domain import Opportunity
    from services.pipeline.rules import Route
    from shared.bus.envelopes import envelope_message, envelope_of
    from shared.contracts.events import LeadCaptured

    lead = LeadCaptured.model_validate({
        "lead_id": str(uuid.uuid4()), "source": "partner", "captured_at": "2026-11-22T09:00:00Z",
        "company": {"name": "Northwind 北风"}, "contact": {"name": "Li Wei"},
        "budget": {"amount": "1.50", "currency": "CNY"},
    })  # fmt: skip
    opportunity = Opportunity.open_from_lead(lead, Rules(), Route("rep1", "xian", "r"), "e", "c")
    for event in opportunity.collect_events():
        message = envelope_message("opportunity.events.v1", event, "pipeline")
        assert Envelope.model_validate_json(message.value) == envelope_of(event)
        assert message.key == str(event.originator_id).encode()


def test_the_relays_route_from_the_stored_event_writes_what_the_revived_event_would() -> None:
    """`PublishedRoute.stored` writes envelopes from the stored JSON without reviving the event;
    for every kind of stored event (published or not) it writes exactly the general path's
    messages, and a state it cannot read as such goes the general way (`None`)."""
    from eventsourcing.persistence import Mapper, Notification

    from services.pipeline.app import PipelineApp
    from services.pipeline.bus import route
    from services.pipeline.domain import Opportunity
    from services.pipeline.rules import Route
    from shared.contracts.events import LeadCaptured

    lead = LeadCaptured.model_validate({
        "lead_id": str(uuid.uuid4()), "source": "partner", "captured_at": "2026-11-22T09:00:00Z",
        "company": {"name": "Northwind 北风", "region": "华东"}, "contact": {"name": "Li Wei"},
        "budget": {"amount": "1200.50", "currency": "CNY"},
    })  # fmt: skip
    rules = Rules()
    opportunity = Opportunity.open_from_lead(lead, rules, Route("rep1", "xian", "r"), "e", "c")
    at = datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=UTC)
    with opportunity.acting("corr-2", "cause-2"):
        opportunity.change_stage("B", "rep1", at, rules)
        opportunity.log_follow_up("call", "说好了 \u2028 fine", "rep1", at.replace(microsecond=0))
        opportunity.change_amount("expected", Money(amount=Decimal("99.90"), currency="CNY"),
                                  "rep1", at, rules)  # fmt: skip
    # The store's own transcoder and mapper, without a database.
    mapper = Mapper(transcoder=PipelineApp.construct_transcoder(PipelineApp.__new__(PipelineApp)))
    events = opportunity.collect_events()
    assert len(events) >= 6
    for n, event in enumerate(events, start=1):
        stored = mapper.to_stored_event(event)
        notification = Notification(id=n, originator_id=stored.originator_id,
                                    originator_version=stored.originator_version,
                                    topic=stored.topic, state=stored.state)  # fmt: skip
        assert route.stored(notification) == route(event, notification)
        assert route.stored(notification)  # every opportunity event is published
    for state in (b'{"x": 12345678901234567890}', b'{"timestamp": 1}', b"not json"):
        odd = Notification(id=9, originator_id=stored.originator_id, originator_version=9,
                           topic=stored.topic, state=state)  # fmt: skip
        assert route.stored(odd) is None


def test_money_amounts_are_strings_on_the_wire() -> None:
    with pytest.raises(ValidationError, match="decimal string"):
        Money.model_validate({"amount": 12.5, "currency": "CNY"})
    with pytest.raises(ValidationError, match="decimal string"):
        Money.model_validate_json('{"amount": 100, "currency": "CNY"}')
    assert Money.model_validate_json('{"amount": "100", "currency": "CNY"}').amount == Decimal(
        "100.00"
    )


def test_addresses_are_checked_in_full_at_the_edge_and_by_shape_off_the_bus() -> None:
    from shared.contracts.partner import FROM_BUS, Contact

    assert Contact(name="Li", email="Li.Wei@Example.CN").email == "Li.Wei@example.cn"
    for bad in ("li@localhost", "li@@x.cn", "li@.cn", "li wei@x.cn"):
        with pytest.raises(ValidationError, match="valid email"):
            Contact(name="Li", email=bad)
    # Off the bus the address was checked by capture: its shape is what is checked again.
    trusted = Contact.model_validate({"name": "Li", "email": "li@x.cn"}, context={FROM_BUS: True})
    assert trusted.email == "li@x.cn"
    for bad in ("no-at-sign", "li wei@x.cn", "x" * 250 + "@x.cn"):
        with pytest.raises(ValidationError, match="valid email"):
            Contact.model_validate({"name": "Li", "email": bad}, context={FROM_BUS: True})


def test_an_envelopes_contract_is_its_data_checked_as_read_off_the_bus() -> None:
    from tests.factories import lead_captured

    envelope = lead_captured(uuid.uuid4())
    assert envelope.contract() is envelope.contract()  # parsed once, on arrival
    renamed = envelope.model_copy(update={"data": {**envelope.data, "source": "event"}})
    assert renamed.contract().source == "event" != envelope.contract().source
    odd = envelope.model_copy(update={"data": {**envelope.data, "budget": 12.5}})
    with pytest.raises(ValidationError):
        odd.contract()


def test_fields_a_newer_producer_added_are_ignored_off_the_bus_and_refused_at_the_edge() -> None:
    from shared.contracts.common import FROM_BUS
    from shared.contracts.events import parse_event_data
    from tests.factories import lead_captured

    data = lead_captured(uuid.uuid4()).data
    newer = {
        **data,
        "campaign": "spring-fair",  # added at the top
        "company": {**data["company"], "employees": 120},  # and inside a nested contract
    }
    read = parse_event_data("LeadCaptured", newer, {FROM_BUS: True})
    assert read == parse_event_data("LeadCaptured", data, {FROM_BUS: True})
    assert newer["campaign"] == "spring-fair"  # the envelope's own data is left whole
    with pytest.raises(ValidationError, match="campaign"):
        parse_event_data("LeadCaptured", newer)  # at the edge: refused
    broken = {**newer, "budget": 12.5}  # an unknown field does not hide a real error
    with pytest.raises(ValidationError, match="budget"):
        parse_event_data("LeadCaptured", broken, {FROM_BUS: True})


# UtcTime as pydantic alone reads it: its parse, then the zone made UTC.
_PYDANTIC_TIME = TypeAdapter(Annotated[datetime, AfterValidator(_utc)])
_UTC_TIME = TypeAdapter(UtcTime)
_TIME_CHARS = "0123456789-:.TtZz+ ,_\u0661\uff10"


def _read(adapter: TypeAdapter[datetime], text: str) -> tuple[str, object]:
    try:
        value = adapter.validate_python(text)
    except ValidationError:
        return ("refused", None)
    return ("read", (value, value.tzinfo is UTC))


@st.composite
def _time_texts(draw: st.DrawFn) -> str:
    """A time as the services write it, with up to three characters changed, added or taken
    away (a digit, a separator, a zone, a non-ASCII digit)."""
    at = draw(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31)))
    spec = draw(st.sampled_from(["seconds", "milliseconds", "microseconds"]))
    text = list(at.isoformat(timespec=spec) + "Z")
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.integers(0, len(text) - 1))
        change = draw(st.sampled_from(["replace", "insert", "delete"]))
        if change == "delete" and len(text) > 1:
            del text[where]
        else:
            char = draw(st.sampled_from(_TIME_CHARS))
            text[where : where + (change == "replace")] = [char]
    return "".join(text)


@settings(max_examples=3000)
@given(st.one_of(_time_texts(), st.text(_TIME_CHARS, min_size=18, max_size=28)))
def test_utc_times_read_by_the_standard_library_read_as_pydantic_reads_them(text: str) -> None:
    """The fast path of UtcTime (`_utc_text`) reads every text as pydantic would: the same
    time in UTC, or refused."""
    assert _read(_UTC_TIME, text) == _read(_PYDANTIC_TIME, text)


def test_a_time_asked_about_is_in_utc_or_refused_at_the_calendars_ends() -> None:
    from datetime import UTC, datetime, timedelta, timezone

    from shared.clock import asked_time

    new_york = timezone(timedelta(hours=-5))
    assert asked_time(datetime(2026, 12, 1, 7, tzinfo=new_york)) == datetime(
        2026, 12, 1, 12, tzinfo=UTC
    )
    assert asked_time(datetime(9999, 12, 31, 23, tzinfo=new_york)) is None  # OverflowError
    assert asked_time(datetime(1, 1, 15, tzinfo=UTC)) is None
    assert asked_time(datetime(2026, 12, 1)) is None  # no zone
