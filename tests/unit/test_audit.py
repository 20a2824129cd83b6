"""The audit's findings (SPEC §7) on a lost deal's history as pipeline stores it: silences
longer than the stage allows, moves back, amount cuts, owner changes, escalations nobody
answered, refused commands; and the days spent in each stage."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.pipeline.audit import findings, owner_of, stage_days, team_of, timeline
from services.pipeline.views import HistoryEntry
from shared.contracts.common import Money
from shared.contracts.envelope import Envelope
from shared.settings import Rules
from tests.notify_support import Deal

T = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)
RULES = Rules()


def entry(e: Envelope) -> HistoryEntry:
    """A history entry of a stored event, from the envelope the relay would publish of it."""
    return HistoryEntry(version=e.stream_version, event_type=e.event_type,
                        occurred_at=e.occurred_at, actor=e.data.get("actor", "system"),
                        data=e.data)  # fmt: skip


def test_a_lost_deals_findings_name_what_went_wrong() -> None:
    deal = Deal(T, amount="90000.00", budget={"amount": "90000.00", "currency": "CNY"},
                authority="decision_maker")  # fmt: skip
    o = deal.o
    o.change_stage("B", "rep.wang", T + DAY, RULES)
    o.change_stage("C", "rep.wang", T + 3 * DAY, RULES)
    o.change_stage("B", "rep.wang", T + 4 * DAY, RULES, note="budget moved")
    o.change_amount("expected", Money(amount="60000.00", currency="CNY"), "rep.wang", T + 5 * DAY,
                    RULES)  # fmt: skip
    o.assign("rep.li", "east", "mgr.zhao", T + 6 * DAY)
    o.lose("no_decision", "rep.li", T + 20 * DAY, RULES)  # B again for 16 silent days
    deal.take()
    events = [entry(e) for e in deal.log]
    notes = [{"kind": "follow_up_due", "recipient": "rep.li", "issued_at": T + 11 * DAY},
             {"kind": "escalation", "recipient": "mgr.zhao", "issued_at": T + 13 * DAY},
             {"kind": "escalation", "recipient": "vp.sun", "issued_at": T + 13 * DAY},
             {"kind": "stale_warning", "recipient": "rep.li",
              "issued_at": T + 40 * DAY}]  # fmt: skip
    refusals = [{"command": "stage", "code": "stage_skip", "actor": "rep.wang",
                 "refused_at": T + 2 * DAY}]  # fmt: skip
    found = findings(events, notes, refusals, RULES)
    assert found == [
        "moved back from C to B",
        "amount cut from 90000.00 to 60000.00",
        "no follow-up for 16 days in B (allowed 5)",
        "owner changed 1 time(s)",
        "escalated 2 time(s), no response",
        "1 follow-up reminder(s) before the loss",
        "refused commands: stage_skip x1",
    ]
    assert stage_days(events, T + 20 * DAY) == {"A": 1.0, "B": 18.0, "C": 1.0}
    told = timeline(events, notes, refusals)
    assert [e["source"] for e in told].count("notification") == 4
    assert told == sorted(told, key=lambda e: (e["at"], e.get("version", 0)))


def test_a_lost_deals_owner_and_team_are_who_held_it_last() -> None:
    """A deal recycled and reactivated to someone else was theirs when it was lost."""
    deal = Deal(T)
    o = deal.o
    o.recycle(T + 61 * DAY, RULES)
    o.reactivate("rep.li", "west", "mgr.zhao", T + 62 * DAY)
    o.lose("timing", "rep.li", T + 70 * DAY, RULES)
    deal.take()
    events = [entry(e) for e in deal.log]
    assert (owner_of(events), team_of(events)) == ("rep.li", "west")
    assert owner_of(events[:3]) == "rep.wang"  # as first assigned
