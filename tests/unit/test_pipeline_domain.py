"""The Opportunity aggregate (SPEC §4): stages, exit criteria, terminal outcomes, scoring, tiers
and routing; and, with hypothesis, invariants that hold for any sequence of commands."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.pipeline.domain import Opportunity, Refused, opportunity_id_for
from services.pipeline.rules import Route, bant, route, tier
from shared.contracts.common import Money
from shared.contracts.events import LeadCaptured
from shared.settings import STAGES, Directory, Routing, RoutingRule, Rules, Tiers, User

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
RULES = Rules()
CNY = "CNY"


def lead(**overrides: object) -> LeadCaptured:
    body: dict[str, object] = {
        "lead_id": str(uuid.uuid4()),
        "source": "partner",
        "partner_id": "acme",
        "message_id": "acme-1",
        "captured_at": "2026-11-22T09:00:00Z",
        "company": {"name": "Northwind", "region": "CN-SN", "industry": "logistics"},
        "contact": {"name": "Li Wei"},
        "need": "12 branches",
        "budget": {"amount": "350000.00", "currency": CNY},
        "authority": "decision_maker",
        "timeline": "this_quarter",
    }
    body.update(overrides)
    return LeadCaptured.model_validate(body)


def opened(**overrides: object) -> Opportunity:
    return Opportunity.open_from_lead(
        lead(**overrides), RULES, Route("rep1", "xian", "r1"), "e", "c"
    )


def money(amount: str) -> Money:
    return Money(amount=Decimal(amount), currency=CNY)


def test_a_lead_opens_one_opportunity_scored_tiered_and_assigned() -> None:
    captured = lead()
    opportunity = Opportunity.open_from_lead(captured, RULES, Route("rep1", "xian", "r1"), "e", "c")
    assert opportunity.id == opportunity_id_for(captured.lead_id)
    assert (opportunity.stage, opportunity.probability, opportunity.status) == ("A", 10, "open")
    assert (opportunity.score, opportunity.grade, opportunity.tier) == (95, "A", "major")
    assert (opportunity.owner, opportunity.team) == ("rep1", "xian")
    events = opportunity.collect_events()
    assert [e.public_name for e in events] == [
        "OpportunityOpened",
        "OpportunityScored",
        "OpportunityAssigned",
    ]
    assert [e.originator_version for e in events] == [1, 2, 3]
    assert all(e.timestamp == captured.captured_at for e in events)


def test_forward_one_stage_at_a_time_back_with_a_note_and_exit_criteria() -> None:
    o = opened()
    o.change_stage("B", "rep1", NOW, RULES)
    assert (o.stage, o.probability) == ("B", 25)
    with pytest.raises(Refused) as skip:
        o.change_stage("D", "rep1", NOW, RULES)
    assert skip.value.code == "stage_skip"
    with pytest.raises(Refused) as back:
        o.change_stage("A", "rep1", NOW, RULES)
    assert back.value.code == "note_required"
    o.change_stage("C", "rep1", NOW, RULES)
    o.change_stage("D", "rep1", NOW, RULES)
    with pytest.raises(Refused) as criteria:
        o.change_stage("E", "rep1", NOW, RULES)  # D needs a proposal amount
    assert criteria.value.code == "exit_criteria_unmet"
    assert criteria.value.detail["missing"] == ["proposal_amount"]
    o.change_amount("proposal", money("300000.00"), "rep1", NOW, RULES)
    o.change_stage("E", "rep1", NOW, RULES)
    with pytest.raises(Refused) as to_f:
        o.change_stage("F", "rep1", NOW, RULES)
    assert to_f.value.code == "use_win"


def test_b_needs_budget_and_decision_maker() -> None:
    o = opened(budget=None, authority="influencer")
    o.change_stage("B", "rep1", NOW, RULES)
    with pytest.raises(Refused) as unmet:
        o.change_stage("C", "rep1", NOW, RULES)
    assert unmet.value.detail["missing"] == ["budget", "decision_maker"]
    o.change_amount("expected", money("60000.00"), "rep1", NOW, RULES)
    o.log_follow_up("visit", "met the CFO, who decides", "rep1", NOW, authority="decision_maker")
    o.change_stage("C", "rep1", NOW, RULES)
    assert (o.stage, o.tier) == ("C", "important")


def test_win_payments_loss_reopen_recycle_reactivate() -> None:
    o = opened()
    with pytest.raises(Refused) as early:
        o.win(money("1.00"), "rep1", NOW, RULES)
    assert early.value.code == "not_closing"
    for stage in "BCD":
        o.change_stage(stage, "rep1", NOW, RULES)
    o.change_amount("proposal", money("320000.00"), "rep1", NOW, RULES)
    o.change_stage("E", "rep1", NOW, RULES)
    o.win(money("310000.00"), "rep1", NOW, RULES)
    assert (o.status, o.stage, o.probability) == ("won", "F", 100)
    o.receive_payment(money("100000.00"), "ops1", NOW)
    o.receive_payment(money("50000.00"), "ops1", NOW)
    assert o.received == money("150000.00")
    with pytest.raises(Refused) as terminal:
        o.change_stage("E", "rep1", NOW, RULES, note="no")
    assert terminal.value.code == "not_open"

    lost = opened()
    lost.change_stage("B", "rep1", NOW, RULES)
    lost.change_stage("C", "rep1", NOW, RULES)
    with pytest.raises(Refused) as unknown:
        lost.lose("bad_luck", "rep1", NOW, RULES)
    assert unknown.value.code == "unknown_reason"
    lost.lose("competitor", "rep1", NOW, RULES, note="cheaper", competitor="Globex")
    assert (lost.status, lost.lost_stage) == ("lost", "C")
    lost.reopen("mgr1", NOW, RULES, note="budget back")
    assert (lost.status, lost.stage, lost.probability) == ("open", "C", 50)

    idle = opened()
    with pytest.raises(Refused) as busy:
        idle.recycle(NOW, RULES)
    assert busy.value.code == "not_idle"
    idle.recycle(NOW + timedelta(days=61), RULES)
    assert (idle.status, idle.owner) == ("recycled", None)
    idle.reactivate("rep2", "xian", "mgr1", NOW + timedelta(days=62))
    assert (idle.status, idle.owner) == ("open", "rep2")


def test_payments_past_what_an_amount_holds_and_far_promises_are_refused() -> None:
    """Refusals (422), not a ValidationError (500) on the payments' total, nor a promised
    follow-up in year 1 that notify would then remind of at every tick."""
    o = opened()
    with pytest.raises(Refused) as far:
        o.log_follow_up("call", "x", "rep1", NOW, next_follow_up_at=datetime(1, 1, 1, tzinfo=UTC))
    assert far.value.code == "follow_up_out_of_range"
    o.log_follow_up("call", "x", "rep1", NOW, next_follow_up_at=NOW + timedelta(days=30))
    for stage in "BCD":
        o.change_stage(stage, "rep1", NOW, RULES)
    o.change_amount("proposal", money("320000.00"), "rep1", NOW, RULES)
    o.change_stage("E", "rep1", NOW, RULES)
    o.win(money("310000.00"), "rep1", NOW, RULES)
    o.receive_payment(money("999999999999999.99"), "ops1", NOW)
    with pytest.raises(Refused) as beyond:
        o.receive_payment(money("999999999999999.99"), "ops1", NOW)
    assert beyond.value.code == "amount_out_of_range"
    assert o.received == money("999999999999999.99")


def test_probability_override_ends_at_the_next_stage_change() -> None:
    o = opened()
    o.override_probability(30, "rep1", NOW)
    assert o.probability == 30
    o.change_stage("B", "rep1", NOW, RULES)
    assert (o.probability, o.probability_overridden) == (25, False)
    # Losing and reopening, or winning, is a stage change too: the override is over.
    o.override_probability(60, "rep1", NOW)
    o.lose("timing", "rep1", NOW, RULES, note="next year")
    o.reopen("mgr1", NOW, RULES, note="budget back")
    assert (o.stage, o.probability, o.probability_overridden) == ("B", 25, False)
    for stage in "CDE":
        o.change_amount("proposal", money("320000.00"), "rep1", NOW, RULES)
        o.change_stage(stage, "rep1", NOW, RULES)
    o.override_probability(95, "rep1", NOW)
    o.win(money("310000.00"), "rep1", NOW, RULES)
    assert (o.stage, o.probability, o.probability_overridden) == ("F", 100, False)


def test_winning_leaves_stage_e_only_with_its_exit_criteria() -> None:
    """No role bypasses the rules: /win leaves E for F, so E's criteria hold there too."""
    rules = Rules(exit_criteria={"E": ["decision_maker"]})
    o = opened(authority="influencer")
    for stage in "BCDE":
        o.change_stage(stage, "rep1", NOW, rules)
    with pytest.raises(Refused) as unmet:
        o.win(money("310000.00"), "rep1", NOW, rules)
    assert (unmet.value.code, unmet.value.detail["missing"]) == (
        "exit_criteria_unmet",
        ["decision_maker"],
    )
    assert o.status == "open"
    o.log_follow_up("visit", "met the CEO", "rep1", NOW, authority="decision_maker")
    # One currency a deal (reporting sums its amount, contract and payments together).
    with pytest.raises(Refused) as other_currency:
        o.win(Money(amount=Decimal("50000.00"), currency="USD"), "rep1", NOW, rules)
    assert other_currency.value.code == "currency_mismatch"
    o.change_amount("expected", Money(amount=Decimal("50000.00"), currency="USD"), "rep1", NOW,
                    rules)  # fmt: skip
    o.win(Money(amount=Decimal("48000.00"), currency="USD"), "rep1", NOW, rules)
    assert (o.status, o.contract_amount) == (
        "won",
        Money(amount=Decimal("48000.00"), currency="USD"),
    )


def test_bant_tiers_and_routing() -> None:
    assert bant(lead(budget=None, authority="unknown", need=None, timeline="unknown")).total == 0
    assert bant(lead()).grade == "A"
    tiers = Tiers()
    assert [tier(money(a), tiers) for a in ("19999.99", "20000", "49999", "50000", "200000")] == [
        "small",
        "normal",
        "normal",
        "important",
        "major",
    ]
    # Thresholds are CNY: a dollar amount is converted at the configured rate first.
    usd = Money(amount=Decimal("10000.00"), currency="USD")
    assert tier(usd, Tiers(cny_per={"USD": Decimal("7.10")})) == "important"  # 71,000 CNY
    assert tier(usd, Tiers()) == "small"  # no rate: compared as it is
    with pytest.raises(ValidationError):
        Tiers.model_validate({"cny_per": {"usd": "7.1"}})
    with pytest.raises(ValidationError):
        Tiers.model_validate({"cny_per": {"USD": "0"}})
    directory = Directory(
        users=[
            User(id="r1", team="xian"),
            User(id="r2", team="xian"),
            User(id="m1", team="xian", role="manager"),
        ]
    )
    routing = Routing(rules=[RoutingRule(team="xian", region="CN-SN")], load_cap=2)
    assert route(lead(), directory, routing, {}) == Route("r1", "xian", "routing_rule_1")
    assert route(lead(), directory, routing, {"r1": 1}).owner == "r2"
    assert route(lead(), directory, routing, {"r1": 2, "r2": 2}).owner is None
    other = lead(company={"name": "X", "region": "CN-BJ"})
    assert route(other, directory, routing, {}) == Route(None, None, "no_rule")


COMMANDS = st.lists(
    st.one_of(
        st.tuples(st.just("stage"), st.sampled_from(STAGES), st.booleans()),
        st.tuples(st.just("proposal"), st.just(""), st.booleans()),
        st.tuples(st.just("win"), st.just(""), st.booleans()),
        st.tuples(st.just("lose"), st.sampled_from(["price", "nope"]), st.booleans()),
        st.tuples(st.just("reopen"), st.just(""), st.booleans()),
        st.tuples(st.just("override"), st.just(""), st.booleans()),
        st.tuples(st.just("pay"), st.just(""), st.booleans()),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(commands=COMMANDS)
def test_any_sequence_of_commands_keeps_the_invariants(
    commands: list[tuple[str, str, bool]],
) -> None:
    o = opened(budget={"amount": "100000.00", "currency": CNY})
    versions = [e.originator_version for e in o.collect_events()]
    for number, (command, argument, flag) in enumerate(commands):
        at = NOW + timedelta(hours=number)
        before = (o.stage, o.status)
        try:
            if command == "stage":
                o.change_stage(argument, "rep1", at, RULES, note="why" if flag else None)
            elif command == "proposal":
                o.change_amount("proposal", money("90000.00"), "rep1", at, RULES)
            elif command == "win":
                o.win(money("90000.00"), "rep1", at, RULES)
            elif command == "lose":
                o.lose(argument, "rep1", at, RULES)
            elif command == "reopen":
                o.reopen("rep1", at, RULES)
            elif command == "override":
                o.override_probability(42, "rep1", at)
            else:
                o.receive_payment(money("10.00"), "ops", at)
        except Refused:
            assert (o.stage, o.status) == before  # a refusal changes nothing
            continue
        new = o.collect_events()
        versions += [e.originator_version for e in new]
        if before[1] in ("won", "lost") and command not in ("reopen", "pay"):
            pytest.fail(f"{command} changed a {before[1]} opportunity")
        if o.stage != before[0] and before[1] == "open" and o.status == "open":
            assert STAGES.index(o.stage) - STAGES.index(before[0]) <= 1  # no skip forward
        if not o.probability_overridden:
            assert o.probability == RULES.probability(o.stage)
    assert versions == list(range(1, len(versions) + 1))  # gap-free
    assert o.version == len(versions)


OPENED_FIELDS = ("lead_id", "title", "company", "region", "industry", "partner_id", "source",
                 "expected_close", "authority", "stage", "probability", "amount",
                 "opened_at")  # fmt: skip


def opened_from(payload: dict[str, object]) -> Opportunity:
    return Opportunity._create(
        Opportunity.Opened, id=uuid.uuid4(), payload=payload, correlation_id="c",
        causation_id="e", timestamp=datetime(2026, 11, 22, tzinfo=UTC),
    )  # fmt: skip


def test_an_opened_payload_is_read_as_its_contract_reads_it() -> None:
    """Opportunity reads its opened payload without validating it again: the same values, of
    the same types, as the contract gives; an older payload without the optional fields gets
    the contract's defaults; a time without a zone is refused."""
    from shared.contracts.events import OpportunityOpened

    lead = LeadCaptured.model_validate({
        "lead_id": str(uuid.uuid4()), "source": "partner", "partner_id": "acme",
        "captured_at": "2026-11-22T09:00:00+08:00", "expected_close": "2027-01-31",
        "company": {"name": "Northwind", "region": "CN-SN", "industry": "retail"},
        "contact": {"name": "Li Wei"}, "budget": {"amount": "1200.50", "currency": "CNY"},
        "authority": "decision_maker",
    })  # fmt: skip
    opportunity = Opportunity.open_from_lead(lead, Rules(), Route("rep1", "xian", "r"), "e", "c")
    payload = opportunity.pending_events[0].payload  # type: ignore[attr-defined]
    contract = OpportunityOpened.model_validate(payload)
    required = ("opportunity_id", "lead_id", "title", "stage", "probability", "source",
                "company", "opened_at")  # fmt: skip
    for opened in (payload, {k: payload[k] for k in required}):
        read = opened_from(opened)
        expected = OpportunityOpened.model_validate(opened)
        for name in OPENED_FIELDS:
            assert getattr(read, name) == getattr(expected, name), name
            assert type(getattr(read, name)) is type(getattr(expected, name)), name
        assert read.opened_at.tzinfo is UTC and read.stage_entered_at == read.opened_at
    assert contract.amount is not None and opportunity.amount == contract.amount
    with pytest.raises(ValueError, match="zone"):
        opened_from({**payload, "opened_at": "2026-11-22T09:00:00"})
