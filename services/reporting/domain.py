"""Reporting's rules, free of I/O: each opportunity's reportable state folded from its events
(a new version at each moment it changed, so any report can be answered as known then), the
stays in each stage, and the payments; and the calendar arithmetic of periods."""

from __future__ import annotations

import uuid
from datetime import date, datetime, timedelta, tzinfo
from decimal import Decimal
from typing import Any, NamedTuple

from shared.clock import date_or_none, from_iso

STAGE_ORDER = "ABCDEF"


class State(NamedTuple):
    """One version of an opportunity, valid from `valid_from` until the next version (a tuple:
    it is also the row written, and `_replace` is cheap on the hot path)."""

    opportunity_id: uuid.UUID
    version: int
    valid_from: datetime
    lead_ids: tuple[uuid.UUID, ...]
    company: str
    source: str
    partner_id: str | None
    region: str | None
    industry: str | None
    owner: str | None
    team: str | None
    tier: str
    status: str  # open | won | lost | recycled
    stage: str
    probability: int
    currency: str | None
    amount: Decimal | None  # the expected amount
    expected_close: date | None
    opened_at: datetime
    stage_entered_at: datetime
    reached: str  # the furthest stage ever reached
    won_at: datetime | None
    won_amount: Decimal | None  # the contract amount
    lost_at: datetime | None
    lost_stage: str | None
    reason_code: str | None
    competitor: str | None
    received: Decimal


class Stay(NamedTuple):
    opportunity_id: uuid.UUID
    stage: str
    entered_at: datetime
    left_at: datetime


class Payment(NamedTuple):
    opportunity_id: uuid.UUID
    version: int
    amount: Decimal
    received_at: datetime


def _money(value: Any) -> tuple[Decimal | None, str | None]:
    if not value:
        return None, None
    return Decimal(str(value["amount"])), str(value["currency"])


def furthest(a: str, b: str) -> str:
    return a if STAGE_ORDER.index(a) >= STAGE_ORDER.index(b) else b


def fold(
    state: State | None, event_type: str, version: int, at: datetime, data: dict[str, Any]
) -> tuple[State | None, list[Stay], list[Payment]]:
    """The state after one event, the stays it ended and the payment it recorded."""
    if event_type == "OpportunityOpened":
        amount, currency = _money(data.get("amount"))
        opened = from_iso(data["opened_at"])
        return (
            State(
                opportunity_id=uuid.UUID(str(data["opportunity_id"])), version=version,
                valid_from=at, lead_ids=(uuid.UUID(str(data["lead_id"])),),
                company=data["company"], source=data["source"], partner_id=data.get("partner_id"),
                region=data.get("region"), industry=data.get("industry"), owner=None, team=None,
                tier="small", status="open", stage=data["stage"],
                probability=int(data["probability"]), currency=currency, amount=amount,
                expected_close=date_or_none(data.get("expected_close")), opened_at=opened,
                stage_entered_at=opened, reached=data["stage"], won_at=None, won_amount=None,
                lost_at=None, lost_stage=None, reason_code=None, competitor=None,
                received=Decimal(0),
            ),
            [],
            [],
        )  # fmt: skip
    if state is None:
        return None, [], []  # opened before reporting's history began
    s = state._replace(version=version, valid_from=at)
    stays: list[Stay] = []
    payments: list[Payment] = []

    def leave(when: datetime) -> None:
        stays.append(Stay(s.opportunity_id, s.stage, s.stage_entered_at, when))

    if event_type == "OpportunityScored":
        s = s._replace(tier=data["tier"])
    elif event_type in ("OpportunityAssigned", "OpportunityReactivated"):
        s = s._replace(owner=data.get("owner"), team=data.get("team"))
        if event_type == "OpportunityReactivated":
            s = s._replace(status="open")
    elif event_type == "OpportunityStageChanged":
        when = from_iso(data["changed_at"])
        leave(when)
        reached = furthest(s.reached, data["to_stage"])
        s = s._replace(stage=data["to_stage"], probability=int(data["probability"]),
                    stage_entered_at=when, reached=reached)  # fmt: skip
        if data["to_stage"] == "F":
            s = s._replace(status="won", won_at=when)
    elif event_type == "OpportunityProbabilityOverridden":
        s = s._replace(probability=int(data["probability"]))
    elif event_type == "OpportunityAmountChanged":
        amount, currency = _money(data["amount"])
        s = s._replace(amount=amount, currency=currency, tier=data["tier"])
    elif event_type == "OpportunityWon":
        when = from_iso(data["won_at"])
        leave(when)
        won, currency = _money(data["contract_amount"])
        s = s._replace(status="won", stage="F", probability=100, stage_entered_at=when,
                    reached="F", won_at=when, won_amount=won,
                    currency=s.currency or currency)  # fmt: skip
    elif event_type == "PaymentReceived":
        paid, _ = _money(data["amount"])
        assert paid is not None
        payments.append(Payment(s.opportunity_id, version, paid, from_iso(data["received_at"])))
        s = s._replace(received=s.received + paid)
    elif event_type == "OpportunityLost":
        when = from_iso(data["lost_at"])
        leave(when)
        s = s._replace(status="lost", lost_at=when, lost_stage=data["stage"],
                    reason_code=data["reason_code"], competitor=data.get("competitor"))  # fmt: skip
    elif event_type == "OpportunityReopened":
        s = s._replace(status="open", stage=data["stage"], probability=int(data["probability"]),
                    stage_entered_at=from_iso(data["reopened_at"]), lost_at=None, lost_stage=None,
                    reason_code=None, competitor=None)  # fmt: skip
    elif event_type == "OpportunityRecycled":
        s = s._replace(status="recycled", owner=None, team=data.get("team"))
    elif event_type == "LeadAttached":
        s = s._replace(lead_ids=(*s.lead_ids, uuid.UUID(str(data["lead_id"]))))
    elif event_type == "LeadDetached":
        gone = uuid.UUID(str(data["lead_id"]))
        s = s._replace(lead_ids=tuple(lead for lead in s.lead_ids if lead != gone))
    else:
        return state, [], []  # nothing reportable changed (a follow-up, say)
    return s, stays, payments


# -- periods ---------------------------------------------------------------------------------


def month_start(day: date, shift: int = 0) -> date:
    months = day.year * 12 + day.month - 1 + shift
    return date(months // 12, months % 12 + 1, 1)


def at_midnight(day: date, zone: tzinfo) -> datetime:
    """The start of `day` in `zone` (the reports' calendar: `[reporting] timezone`)."""
    return datetime(day.year, day.month, day.day, tzinfo=zone)


def period_start(at: datetime, grain: str, zone: tzinfo) -> datetime:
    """The start of the day, week (Monday), month or quarter `at` falls in, in `zone`."""
    day = at.astimezone(zone).date()
    if grain == "day":
        return at_midnight(day, zone)
    if grain == "week":
        return at_midnight(day - timedelta(days=day.weekday()), zone)
    if grain == "month":
        return at_midnight(month_start(day), zone)
    if grain == "quarter":
        return at_midnight(date(day.year, (day.month - 1) // 3 * 3 + 1, 1), zone)
    raise ValueError(f"unknown grain {grain!r}")


def next_period(start: datetime, grain: str, zone: tzinfo) -> datetime:
    """The start of the period after the one `start` begins (counted in local days: a day
    across a change of clocks is 23 or 25 hours)."""
    day = start.astimezone(zone).date()
    if grain in ("day", "week"):
        return at_midnight(day + timedelta(days=1 if grain == "day" else 7), zone)
    return at_midnight(month_start(day, {"month": 1, "quarter": 3}[grain]), zone)


def previous_period(begin: datetime, finish: datetime, zone: tzinfo) -> tuple[datetime, datetime]:
    """环比: the period before [begin, finish). One that starts a calendar quarter, month, week
    or day (in `zone`) and ends within it is compared with the same part of the unit before
    (the smallest such unit): March with February, 1-15 March with 1-15 February, Q2 with Q1.
    Any other span is compared with the span of the same length just before it."""
    for grain in ("day", "week", "month", "quarter"):
        if period_start(begin, grain, zone) == begin and finish <= next_period(begin, grain, zone):
            before = period_start(begin - timedelta(microseconds=1), grain, zone)
            if finish == next_period(begin, grain, zone):
                return before, begin
            # The same part of the unit before, in the zone's clock time (`from` and `to` may
            # have been given in different zones).
            part = finish.astimezone(zone) - begin.astimezone(zone)
            return before, min(before + part, begin)
    return begin - (finish - begin), begin


def year_before(at: datetime) -> datetime:
    try:
        return at.replace(year=at.year - 1)
    except ValueError:  # 29 February
        return at.replace(year=at.year - 1, day=28)


def fresh_window(at: datetime, zone: tzinfo) -> tuple[datetime, date]:
    """鲜活商机 at `at`: created from the start of the month two months back (the last three
    calendar months in `zone`, this one included), expected to close by the end of next month."""
    day = at.astimezone(zone).date()
    created_from = at_midnight(month_start(day, -2), zone)
    close_by = month_start(day, 2) - timedelta(days=1)
    return created_from, close_by
