"""Due work as of an injected `now`: fire the due timers and this week's digests into
notifications, each with one delivery per channel. Timers are claimed with `FOR UPDATE SKIP
LOCKED`, so replicas share the work, and every notification has a unique key, so nothing is
issued twice — not on a redelivery, a replay, or a second replica."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg

from services.notify import domain
from services.notify.domain import Picture, Recipient, TimerKind
from services.notify.templates import digest_lines, render
from services.notify.timers import picture_of
from shared.clock import utc_iso
from shared.contracts.notifications import DigestLine, NotificationIssued
from shared.settings import Rules, Settings

log = logging.getLogger(__name__)

NOTIFICATION_NAMESPACE = uuid.UUID("0d7cbe1e-4f7a-4d0e-8b6e-6a2f4a0f1c33")
KIND_OF_TIMER: dict[str, str] = {
    "follow_up": "follow_up_due",
    "escalate_manager": "escalation",
    "escalate_branch": "escalation",
    "stale": "stale_warning",
    "expected_close": "expected_close_passed",
    "recycled": "recycled",
}


@dataclass(frozen=True)
class Channels:
    """Which channels are configured: the bus always; e-mail with an SMTP host (and an address);
    the webhook with a URL."""

    email: bool
    webhook: str | None
    public_url: str

    @classmethod
    def of(cls, settings: Settings) -> Channels:
        return cls(bool(settings.smtp_host), settings.webhook_url, settings.public_url.rstrip("/"))

    def for_recipient(self, who: Recipient) -> list[tuple[str, str | None]]:
        found: list[tuple[str, str | None]] = [("kafka", None)]
        if self.email and who.email:
            found.append(("email", who.email))
        if self.webhook:
            found.append(("webhook", self.webhook))
        return found


@dataclass(frozen=True)
class Draft:
    key: str
    notification: NotificationIssued
    addresses: list[tuple[str, str | None]]


def draft(key: str, who: Recipient, channels: Channels, **fields: Any) -> Draft:
    addresses = channels.for_recipient(who)
    notification = NotificationIssued(
        notification_id=uuid.uuid5(NOTIFICATION_NAMESPACE, key),
        recipient=who.user,
        recipient_role=who.role,
        locale=who.locale,
        channels=[channel for channel, _ in addresses],
        **fields,
    )
    return Draft(key, notification, addresses)


def drafts_for_timer(
    timer: TimerKind, p: Picture, due: datetime, derived_from: uuid.UUID, now: datetime,
    rules: Rules, channels: Channels,
) -> list[Draft]:  # fmt: skip
    kind = KIND_OF_TIMER[timer]
    follow_up_due = domain.follow_up_due(p, rules)
    overdue = domain.overdue_days(follow_up_due, now) if follow_up_due else None
    # What the notification says fell due: the follow-up for a reminder or an escalation; for
    # the others their own moment (idle too long, the expected close, the recycling).
    about_follow_up = kind in ("follow_up_due", "escalation")
    due_at = (follow_up_due or due) if about_follow_up else due
    late = overdue if about_follow_up else domain.overdue_days(due, now)
    path = domain.chain(p, rules)
    link = f"{channels.public_url}/v1/opportunities/{p.opportunity_id}"
    idle = max(0, (now - p.last_activity_at).days)
    found = []
    for who in domain.recipients_of(timer, p, rules):
        text = render(
            kind, who.locale, rules, title=p.title, company=p.company, stage=p.stage,
            owner=p.owner or "-", team=p.team or "-", link=link, overdue=overdue or 0,
            due=_local(follow_up_due or due, who), chain=" → ".join(path) or "-", idle=idle,
            last_activity=_local(p.last_activity_at, who), recycle_days=rules.recycle_days,
            expected_close=p.expected_close.isoformat() if p.expected_close else "-",
        )  # fmt: skip
        before: dict[str, Any] = {"stage": p.stage, "owner": p.owner, "status": p.status}
        after: dict[str, Any] = dict(before)
        if kind in ("follow_up_due", "escalation"):
            before["follow_up"] = "due"
            after["follow_up"] = "overdue" if overdue else "due"
            after["overdue_days"] = overdue
            if kind == "escalation":
                after["escalated_to"] = who.user
        elif kind == "recycled":
            before["status"], after["owner"] = "open", None
        elif kind == "stale_warning":
            after["idle_days"] = idle
        key = f"{kind}:{p.opportunity_id}:{derived_from}:{timer}:{who.role}:{who.user}"
        found.append(
            draft(
                key,
                who,
                channels,
                kind=kind,
                opportunity_id=p.opportunity_id,
                team=p.team,
                subject=text.subject,
                body=text.body,
                link=link,
                due_at=due_at,
                overdue_days=late,
                chain=path if kind == "escalation" else [],
                derived_from=[derived_from],
                before=before,
                after=after,
                issued_at=now,
            )
        )
    return found


def _local(at: datetime, who: Recipient) -> str:
    try:
        return at.astimezone(ZoneInfo(who.timezone)).strftime("%Y-%m-%d %H:%M %Z")
    except OverflowError:  # a time at the calendar's ends has no local time in some zones
        return utc_iso(at)


async def store(conn: asyncpg.Connection, drafts: list[Draft]) -> list[NotificationIssued]:
    """Insert the notifications not issued before, and their deliveries; those that were new
    (for the caller to log once its transaction commits)."""
    if not drafts:
        return []
    new = await conn.fetch(
        "INSERT INTO notification"
        " (notification_id, key, kind, opportunity_id, team, recipient, issued_at, payload)"
        " SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::uuid[], $5::text[],"
        " $6::text[], $7::timestamptz[], $8::jsonb[])"
        " ON CONFLICT (key) DO NOTHING RETURNING notification_id",
        [d.notification.notification_id for d in drafts],
        [d.key for d in drafts],
        [d.notification.kind for d in drafts],
        [d.notification.opportunity_id for d in drafts],
        [d.notification.team for d in drafts],
        [d.notification.recipient for d in drafts],
        [d.notification.issued_at for d in drafts],
        [d.notification.model_dump_json() for d in drafts],
    )
    fresh = {row["notification_id"] for row in new}
    ids, channel, address = [], [], []
    for d in drafts:
        if d.notification.notification_id in fresh:
            for name, where in d.addresses:
                ids.append(d.notification.notification_id)
                channel.append(name)
                address.append(where)
    await conn.execute(
        "INSERT INTO delivery (notification_id, channel, address)"
        " SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[])",
        ids,
        channel,
        address,
    )
    return [d.notification for d in drafts if d.notification.notification_id in fresh]


def log_issued(issued: list[NotificationIssued]) -> None:
    for n in issued:
        # As on its envelope (delivery.envelope_value): a reminder is caused by time, so it is
        # correlated with the event that started its clock, which names the request's id.
        log.info("notification issued", extra={
            "correlation_id": str((n.derived_from or [n.notification_id])[0]),
            "kind": n.kind, "opportunity_id": str(n.opportunity_id), "recipient": n.recipient,
        })  # fmt: skip


async def fire_due_timers(
    pool: asyncpg.Pool, now: datetime, rules: Rules, channels: Channels, limit: int = 2000
) -> tuple[int, int]:
    """Fire one page of due timers; (timers fired, notifications issued)."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "SELECT t.kind AS timer_kind, t.due_at AS timer_due, t.derived_from, p.*"
            " FROM timer t JOIN opportunity_picture p USING (opportunity_id)"
            " WHERE t.fired_at IS NULL AND t.due_at <= $1"
            " ORDER BY t.due_at LIMIT $2 FOR UPDATE OF t SKIP LOCKED",
            now,
            limit,
        )
        if not rows:
            return 0, 0
        drafts = []
        for row in rows:
            drafts += drafts_for_timer(
                row["timer_kind"], picture_of(row), row["timer_due"], row["derived_from"], now,
                rules, channels,
            )  # fmt: skip
        issued = await store(conn, drafts)
        await conn.execute(
            "UPDATE timer SET fired_at = $3 FROM unnest($1::uuid[], $2::text[]) AS f(o, k)"
            " WHERE timer.opportunity_id = f.o AND timer.kind = f.k",
            [row["opportunity_id"] for row in rows],
            [row["timer_kind"] for row in rows],
            now,
        )
    log_issued(issued)
    return len(rows), len(issued)


DIGEST_LINES = 200  # deals a weekly digest lists at most (the count says how many there are)


async def issue_digests(pool: asyncpg.Pool, now: datetime, rules: Rules, channels: Channels) -> int:
    """Each team's weekly digest to its manager, once per week: the team's overdue follow-ups
    (漏跟进预警) and its important/major deals with no progress in the week before."""
    issued: list[NotificationIssued] = []
    for team in rules.directory.teams:
        moment = domain.digest_time(team.id, now, rules)
        if moment is None or not team.manager:
            continue
        who = domain.recipient(team.manager, "manager", rules)
        key = f"weekly_digest:{team.id}:{moment.date().isoformat()}:{who.user}"
        async with pool.acquire() as conn, conn.transaction():
            if await conn.fetchval("SELECT 1 FROM notification WHERE key = $1", key):
                continue
            overdue = await conn.fetch(
                "SELECT p.*, t.due_at AS follow_up_due FROM opportunity_picture p"
                " JOIN timer t ON t.opportunity_id = p.opportunity_id AND t.kind = 'follow_up'"
                " WHERE p.team = $1 AND p.status = 'open' AND t.due_at <= $2"
                " ORDER BY t.due_at",
                team.id,
                now,
            )
            quiet = await conn.fetch(
                "SELECT p.* FROM opportunity_picture p WHERE p.team = $1 AND p.status = 'open'"
                " AND p.tier IN ('important', 'major') AND p.last_activity_at < $2"
                " ORDER BY p.last_activity_at",
                team.id,
                moment - timedelta(days=7),
            )
            # The most overdue first, then the longest quiet, DIGEST_LINES of them at most: a
            # digest must stay one message (a bus message holds 1 MiB; an unbounded team's
            # digest had none to go in, and stood at the head of the deliveries).
            late = [_line(row, now, row["follow_up_due"]) for row in overdue[:DIGEST_LINES]]
            still = [_line(row, now, None) for row in quiet[: DIGEST_LINES - len(late)]]
            lines = late + still
            text = render(
                "weekly_digest", who.locale, rules, team=team.id, count=len(overdue) + len(quiet),
                overdue_lines=digest_lines(who.locale, [_text(x, who) for x in late],
                                           len(overdue) - len(late)),
                quiet_lines=digest_lines(who.locale, [_text(x, who) for x in still],
                                         len(quiet) - len(still)),
            )  # fmt: skip
            found = draft(
                key, who, channels, kind="weekly_digest", team=team.id, subject=text.subject,
                body=text.body, lines=lines, issued_at=now,
                derived_from=[row["clock_event"] for row in overdue],
            )  # fmt: skip
            new = await store(conn, [found])
        log_issued(new)
        issued += new
    return len(issued)


def _line(row: asyncpg.Record, now: datetime, due: datetime | None) -> DigestLine:
    return DigestLine(
        opportunity_id=row["opportunity_id"], title=row["title"], stage=row["stage"],
        owner=row["owner"], tier=row["tier"], due_at=due,
        overdue_days=domain.overdue_days(due, now) if due else None,
        last_activity_at=row["last_activity_at"],
    )  # fmt: skip


def _text(line: DigestLine, who: Recipient) -> dict[str, object]:
    if line.overdue_days is not None:
        extra = (f", {line.overdue_days} 天逾期" if who.locale == "zh-CN"
                 else f", {line.overdue_days} day(s) overdue")  # fmt: skip
    else:
        extra = f", {utc_iso(line.last_activity_at)}"
    return {"title": line.title, "stage": line.stage, "owner": line.owner or "-",
            "tier": line.tier, "extra": extra}  # fmt: skip
