"""Notify's rules, free of I/O: notify's picture of each opportunity (folded from its events),
the timers that picture implies, who is told when one fires, and when a team's digest is due."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from shared.clock import date_or_none, from_iso
from shared.settings import Rules

TimerKind = Literal[
    "follow_up", "escalate_manager", "escalate_branch", "stale", "expected_close", "recycled"
]
Role = Literal["owner", "manager", "branch_manager"]
DEFAULT_TZ = "Asia/Shanghai"


@dataclass(frozen=True)
class Picture:
    """What notify knows of one opportunity. The follow-up clock runs from `clock_started_at`,
    set by `clock_event` (opened, stage entered, follow-up logged, reassigned, reopened,
    reactivated, recycled)."""

    opportunity_id: uuid.UUID
    title: str
    company: str
    stage: str
    status: str  # open | won | lost | recycled
    owner: str | None
    team: str | None
    tier: str
    expected_close: date | None
    clock_started_at: datetime
    clock_event: uuid.UUID
    next_follow_up_at: datetime | None
    last_activity_at: datetime
    last_activity_event: uuid.UUID
    opened_event: uuid.UUID


# Events that count as activity on the opportunity (the stale clock restarts), as in pipeline.
QUIET_EVENTS = frozenset({"OpportunityScored", "PaymentReceived", "LeadAttached",
                          "LeadDetached"})  # fmt: skip


def fold(
    picture: Picture | None, event_type: str, event_id: uuid.UUID, data: dict[str, Any]
) -> Picture | None:
    """The picture after one event (`data` is the validated contract payload as JSON)."""
    if event_type == "OpportunityOpened":
        at = from_iso(data["opened_at"])
        return Picture(
            opportunity_id=uuid.UUID(str(data["opportunity_id"])),
            title=data["title"], company=data["company"], stage=data["stage"], status="open",
            owner=None, team=None, tier="small",
            expected_close=date_or_none(data.get("expected_close")),
            clock_started_at=at, clock_event=event_id, next_follow_up_at=None,
            last_activity_at=at, last_activity_event=event_id, opened_event=event_id,
        )  # fmt: skip
    if picture is None:
        return None  # an event of an opportunity opened before notify's history began
    p = picture
    restart: datetime | None = None
    if event_type == "OpportunityScored":
        p = replace(p, tier=data["tier"])
    elif event_type == "OpportunityAssigned":
        p = replace(p, owner=data["owner"], team=data["team"])
        if data.get("previous_owner") is not None:
            restart = from_iso(data["assigned_at"])  # a new owner gets the stage's full period
    elif event_type == "OpportunityStageChanged":
        p = replace(p, stage=data["to_stage"])
        restart = from_iso(data["changed_at"])
    elif event_type == "FollowUpLogged":
        restart = from_iso(data["logged_at"])
        nxt = data.get("next_follow_up_at")
        p = replace(p, clock_started_at=restart, clock_event=event_id,
                    next_follow_up_at=from_iso(nxt) if nxt else None)  # fmt: skip
        restart = None  # set above, with the promised date
    elif event_type == "OpportunityAmountChanged":
        p = replace(p, tier=data["tier"])
    elif event_type == "OpportunityWon":
        p = replace(p, status="won", stage="F")
    elif event_type == "OpportunityLost":
        p = replace(p, status="lost")
    elif event_type == "OpportunityReopened":
        p = replace(p, status="open", stage=data["stage"])
        restart = from_iso(data["reopened_at"])
    elif event_type == "OpportunityRecycled":
        recycled = from_iso(data["recycled_at"])
        p = replace(p, status="recycled", owner=None, team=data.get("team"),
                    clock_started_at=recycled, clock_event=event_id,
                    next_follow_up_at=None)  # fmt: skip
    elif event_type == "OpportunityReactivated":
        p = replace(p, status="open", owner=data.get("owner"), team=data.get("team"))
        restart = from_iso(data["reactivated_at"])
    if restart is not None:
        p = replace(p, clock_started_at=restart, clock_event=event_id, next_follow_up_at=None)
    if event_type not in QUIET_EVENTS:
        active = _event_time(event_type, data)
        if active is not None:
            p = replace(p, last_activity_at=active, last_activity_event=event_id)
    return p


def _event_time(event_type: str, data: dict[str, Any]) -> datetime | None:
    for field in ("changed_at", "logged_at", "assigned_at", "won_at", "lost_at", "reopened_at",
                  "recycled_at", "reactivated_at", "overridden_at", "opened_at"):  # fmt: skip
        if field in data:
            return from_iso(data[field])
    return None


def follow_up_days(stage: str, tier: str, rules: Rules) -> int | None:
    override = rules.notify.follow_up_days_by_tier.get(tier, {})  # type: ignore[call-overload]
    if stage in override:
        return int(override[stage])
    return rules.stages[stage].follow_up_days if stage in rules.stages else None


def follow_up_due(p: Picture, rules: Rules) -> datetime | None:
    """Due `follow_up_days` after the clock started, or at the promised next follow-up when that
    is sooner; None where the stage has no follow-up rule (handover) or it is not open."""
    if p.status != "open":
        return None
    days = follow_up_days(p.stage, p.tier, rules)
    if days is None:
        return None
    due = p.clock_started_at + timedelta(days=days)
    if p.next_follow_up_at is not None and p.next_follow_up_at < due:
        due = p.next_follow_up_at
    return due


def team_zone(team: str | None, rules: Rules) -> ZoneInfo:
    found = rules.directory.team(team)
    return ZoneInfo(found.timezone if found else DEFAULT_TZ)


def timers(p: Picture, rules: Rules) -> dict[TimerKind, tuple[datetime, uuid.UUID]]:
    """Every timer the picture implies: kind → (due at, the event that started its clock)."""
    if p.status == "recycled":
        return {"recycled": (p.clock_started_at, p.clock_event)}
    if p.status != "open":
        return {}
    found: dict[TimerKind, tuple[datetime, uuid.UUID]] = {}
    due = follow_up_due(p, rules)
    if due is not None:
        found["follow_up"] = (due, p.clock_event)
        escalate = timedelta(days=rules.notify.escalate_after_days)
        found["escalate_manager"] = (due + escalate, p.clock_event)
        if p.tier == "major":
            found["escalate_branch"] = (due, p.clock_event)  # major deals: at once
    found["stale"] = (p.last_activity_at + timedelta(days=rules.stale_days), p.last_activity_event)
    if p.expected_close is not None and p.expected_close < date.max:  # a day after it to come
        day_after = datetime.combine(p.expected_close + timedelta(days=1), datetime.min.time(),
                                     tzinfo=team_zone(p.team, rules))  # fmt: skip
        found["expected_close"] = (day_after.astimezone(UTC), p.opened_event)
    return found


@dataclass(frozen=True)
class Recipient:
    user: str | None
    role: Role
    locale: Literal["en", "zh-CN"]
    email: str | None
    timezone: str


def recipient(user_id: str | None, role: Role, rules: Rules) -> Recipient:
    user = rules.directory.user(user_id)
    if user is None:
        return Recipient(user_id, role, "zh-CN", None, DEFAULT_TZ)
    return Recipient(user.id, role, user.locale, user.email, user.timezone)


def chain(p: Picture, rules: Rules) -> list[str]:
    """The escalation path of the opportunity: owner → team manager → branch manager."""
    team = rules.directory.team(p.team)
    people = [p.owner, team.manager if team else None, team.branch_manager if team else None]
    return [who for who in people if who]


def recipients_of(kind: TimerKind, p: Picture, rules: Rules) -> list[Recipient]:
    """Who is told when a timer fires. Nobody configured still yields one recipient (None), so
    the notification goes out on the bus and is not lost."""
    team = rules.directory.team(p.team)
    manager = team.manager if team else None
    branch = team.branch_manager if team else None
    if kind in ("follow_up", "expected_close"):
        who = [recipient(p.owner, "owner", rules)] if p.owner else []
        who = who or [recipient(manager, "manager", rules)]  # unowned: the manager follows up
    elif kind == "escalate_manager":
        who = [recipient(manager, "manager", rules)]
    elif kind == "escalate_branch":
        who = [recipient(branch or manager, "branch_manager" if branch else "manager", rules)]
    elif kind == "stale":
        who = [recipient(p.owner, "owner", rules)] if p.owner else []
        who.append(recipient(manager, "manager", rules))
    else:  # recycled: the pool's manager
        who = [recipient(manager, "manager", rules)]
    return who


def digest_time(team: str, now: datetime, rules: Rules) -> datetime | None:
    """This week's digest moment for `team` (Monday 09:00 in the team's zone, daylight saving
    included) when `now` is at or after it and within the grace period; otherwise None."""
    zone = team_zone(team, rules)
    local = now.astimezone(zone)
    day = local.date() - timedelta(days=(local.weekday() - rules.notify.digest_weekday) % 7)
    moment = datetime.combine(day, rules.notify.digest_time, tzinfo=zone)
    if moment > local:
        moment = datetime.combine(day - timedelta(days=7), rules.notify.digest_time, tzinfo=zone)
    moment_utc = moment.astimezone(UTC)
    if now - moment_utc >= timedelta(hours=rules.notify.digest_grace_hours):
        return None
    return moment_utc


def overdue_days(due: datetime, now: datetime) -> int:
    return max(0, (now - due).days)
