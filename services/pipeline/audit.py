"""Operations' audits of the pipeline (SPEC §7): an opportunity as it stood at any moment, and
every lost deal with its whole timeline — its events from the store, the reminders and
escalations notify sent, the commands that were refused — and what went wrong, in words."""

from __future__ import annotations

import csv
import io
import uuid
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

from psycopg.sql import SQL

from services.pipeline.app import PipelineApp
from services.pipeline.views import HistoryEntry, OpportunityView
from shared.clock import utc_iso
from shared.contracts.common import jsonable
from shared.settings import STAGES, Rules

PAGE = 2000
DAY = 86400.0


def timeline(
    events: Sequence[HistoryEntry], notes: Sequence[dict[str, Any]],
    refusals: Sequence[dict[str, Any]],
) -> list[dict[str, Any]]:  # fmt: skip
    """Events, notifications and refused commands of one opportunity, in time order."""
    entries = [{"at": e.occurred_at, "source": "event", "version": e.version,
                "type": e.event_type, "actor": e.actor, "detail": _detail(e)}
               for e in events]  # fmt: skip
    entries += [{"at": n["issued_at"], "source": "notification", "type": n["kind"],
                 "actor": "notify", "detail": f"to {n['recipient'] or '-'}"}
                for n in notes]  # fmt: skip
    entries += [{"at": r["refused_at"], "source": "refused", "type": r["command"],
                 "actor": r["actor"], "detail": r["code"]} for r in refusals]  # fmt: skip
    return sorted(entries, key=lambda e: (e["at"], e.get("version", 0)))


def _detail(e: HistoryEntry) -> str:
    d = e.data
    if e.event_type == "OpportunityStageChanged":
        return f"{d['from_stage']} -> {d['to_stage']}" + (
            f" ({d['note']})" if d.get("note") else ""
        )
    if e.event_type == "FollowUpLogged":
        return f"{d['channel']}: {d['summary']}"
    if e.event_type == "OpportunityAmountChanged":
        was = d.get("previous") or {}
        return f"{d['kind']} {was.get('amount', '-')} -> {d['amount']['amount']}"
    if e.event_type == "OpportunityAssigned":
        return f"{d.get('previous_owner') or '-'} -> {d.get('owner') or '-'} ({d.get('team')})"
    if e.event_type == "OpportunityLost":
        return f"{d['reason_code']} at {d['stage']}" + (f": {d['note']}" if d.get("note") else "")
    if e.event_type == "OpportunityOpened":
        amount = (d.get("amount") or {}).get("amount", "-")
        return f"{d['company']}, {amount}, expected close {d.get('expected_close') or '-'}"
    if e.event_type in ("OpportunityReopened", "OpportunityWon", "PaymentReceived"):
        return ", ".join(f"{k}={v}" for k, v in d.items() if k not in ("opportunity_id", "actor"))
    return ""


def stage_days(events: Sequence[HistoryEntry], until: datetime) -> dict[str, float]:
    """Days spent in each stage (all visits), up to the end of the history or `until`."""
    spent: dict[str, float] = {}
    stage: str | None = None
    since: datetime | None = None
    closed = False
    for e in events:
        name, d = e.event_type, e.data
        entered = None
        if name == "OpportunityOpened":
            entered = d["stage"]
        elif name == "OpportunityStageChanged":
            entered = d["to_stage"]
        elif name == "OpportunityReopened":
            entered, closed = d["stage"], False
        elif name in ("OpportunityLost", "OpportunityWon") and stage and since and not closed:
            spent[stage] = spent.get(stage, 0.0) + (e.occurred_at - since).total_seconds() / DAY
            closed = True
            continue
        if entered is not None:
            if stage and since and not closed:
                spent[stage] = spent.get(stage, 0.0) + (e.occurred_at - since).total_seconds() / DAY
            stage, since = entered, e.occurred_at
    if stage and since and not closed:
        spent[stage] = spent.get(stage, 0.0) + (until - since).total_seconds() / DAY
    return {s: round(spent[s], 2) for s in STAGES if s in spent}


def findings(
    events: Sequence[HistoryEntry], notes: Sequence[dict[str, Any]],
    refusals: Sequence[dict[str, Any]], rules: Rules,
) -> list[str]:  # fmt: skip
    """What went wrong, in words an operator can act on."""
    found: list[str] = []
    lost_at = max((e.occurred_at for e in events if e.event_type == "OpportunityLost"),
                  default=None)  # fmt: skip
    # The longest silence in each stage: from entering it, or the last follow-up, to the next.
    stage: str | None = None
    touched: datetime | None = None
    silences: dict[str, float] = {}
    for e in events:
        if stage and touched and e.event_type in ("FollowUpLogged", "OpportunityStageChanged",
                                                  "OpportunityLost", "OpportunityWon"):  # fmt: skip
            silences[stage] = max(silences.get(stage, 0.0),
                                  (e.occurred_at - touched).total_seconds() / DAY)  # fmt: skip
        if e.event_type in ("OpportunityOpened", "OpportunityStageChanged", "OpportunityReopened",
                            "FollowUpLogged"):  # fmt: skip
            touched = e.occurred_at
            stage = e.data.get("to_stage") or e.data.get("stage") or stage
        if e.event_type == "OpportunityStageChanged":
            a, b = e.data["from_stage"], e.data["to_stage"]
            if STAGES.index(b) < STAGES.index(a):
                found.append(f"moved back from {a} to {b}")
        elif e.event_type == "OpportunityReopened":
            found.append(f"reopened into {e.data['stage']} after a loss")
        elif e.event_type == "OpportunityAmountChanged":
            was = Decimal((e.data.get("previous") or {}).get("amount", "0"))
            now = Decimal(e.data["amount"]["amount"])
            if was and now < was:
                found.append(f"amount cut from {was} to {now}")
        elif e.event_type == "OpportunityRecycled":
            found.append(f"recycled to the pool after {e.data['idle_days']} idle days")
    for s, days in silences.items():
        allowed = rules.stages[s].follow_up_days if s in rules.stages else None
        if allowed is not None and days > allowed:
            found.append(f"no follow-up for {int(days)} days in {s} (allowed {allowed})")
    owners = sum(1 for e in events if e.event_type == "OpportunityAssigned"
                 and e.data.get("previous_owner"))  # fmt: skip
    if owners:
        found.append(f"owner changed {owners} time(s)")
    before = [n for n in notes if lost_at is None or n["issued_at"] <= lost_at]
    escalations = [n for n in before if n["kind"] == "escalation"]
    reminders = [n for n in before if n["kind"] == "follow_up_due"]
    if escalations:
        first = min(n["issued_at"] for n in escalations)
        answered = any(e.event_type == "FollowUpLogged" and e.occurred_at > first for e in events)
        found.append(f"escalated {len(escalations)} time(s)"
                     + ("" if answered else ", no response"))  # fmt: skip
    if reminders:
        found.append(f"{len(reminders)} follow-up reminder(s) before the loss")
    if refusals:
        codes = Counter(r["code"] for r in refusals)
        found.append("refused commands: " + ", ".join(f"{c} x{n}" for c, n in codes.items()))
    return found


def _notify_records(
    app: PipelineApp, ids: list[uuid.UUID]
) -> dict[uuid.UUID, list[dict[str, Any]]]:
    """What notify told whom about these opportunities (empty when notify has no tables)."""
    found: dict[uuid.UUID, list[dict[str, Any]]] = {i: [] for i in ids}
    if not app.query("SELECT to_regclass('notify.notification') IS NOT NULL AS here")[0]["here"]:
        return found
    rows = app.query(
        "SELECT opportunity_id, kind, recipient, issued_at FROM notify.notification"
        " WHERE opportunity_id = ANY(%b::uuid[]) ORDER BY issued_at",
        [ids],
    )
    for row in rows:
        found[row["opportunity_id"]].append(row)
    return found


def _refusals(app: PipelineApp, ids: list[uuid.UUID]) -> dict[uuid.UUID, list[dict[str, Any]]]:
    found: dict[uuid.UUID, list[dict[str, Any]]] = {i: [] for i in ids}
    rows = app.query(
        SQL("SELECT opportunity_id, command, code, actor, refused_at FROM {}"
            " WHERE opportunity_id = ANY(%b::uuid[]) ORDER BY refused_at").format(
            app.table("refused_command")),
        [ids],
    )  # fmt: skip
    for row in rows:
        found[row["opportunity_id"]].append(row)
    return found


def audit_lost(
    app: PipelineApp, rules: Rules, since: datetime | None = None, until: datetime | None = None,
    reason: str | None = None, team: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Every lost deal (lost between `since` and `until`, of `reason`, in `team`)."""
    conditions, params = ["status = 'lost'"], []
    for clause, value in (("last_activity_at >= %s", since), ("last_activity_at < %s", until),
                          ("team = %s", team)):  # fmt: skip
        if value is not None:
            conditions.append(clause)
            params.append(value)
    rows = app.query(
        SQL("SELECT opportunity_id FROM {} WHERE " + " AND ".join(conditions)
            + " ORDER BY last_activity_at, opportunity_id").format(app.table("opportunity_index")),
        params,
    )  # fmt: skip
    ids = [r["opportunity_id"] for r in rows]
    deals = []
    for start in range(0, len(ids), PAGE):
        page = ids[start : start + PAGE]
        histories = app.events_of(page)
        notes, refused = _notify_records(app, page), _refusals(app, page)
        for opportunity_id in page:
            events = [HistoryEntry.of(e) for e in histories[opportunity_id]]
            lost = [e for e in events if e.event_type == "OpportunityLost"][-1]
            if reason is not None and lost.data["reason_code"] != reason:
                continue
            opened = events[0].data
            deals.append({
                "opportunity_id": opportunity_id, "title": opened["title"],
                "company": opened["company"], "team": team_of(events), "owner": owner_of(events),
                "lost_at": lost.occurred_at, "reason": lost.data["reason_code"],
                "competitor": lost.data.get("competitor"), "note": lost.data.get("note"),
                "stage": lost.data["stage"], "amount": amount_of(events),
                "stage_days": stage_days(events, lost.occurred_at),
                "findings": findings(events, notes[opportunity_id], refused[opportunity_id], rules),
                "timeline": timeline(events, notes[opportunity_id], refused[opportunity_id]),
            })  # fmt: skip
    summary = {
        "lost": len(deals),
        "by_reason": dict(Counter(d["reason"] for d in deals).most_common()),
        "by_stage": dict(sorted(Counter(d["stage"] for d in deals).items())),
        "by_team": dict(Counter(d["team"] or "-" for d in deals).most_common()),
    }
    return {"deals": deals, "summary": summary}


ASSIGNING = ("OpportunityAssigned", "OpportunityReactivated")  # the events that name an owner


def team_of(events: Sequence[HistoryEntry]) -> str | None:
    return next((e.data.get("team") for e in reversed(events) if e.event_type in ASSIGNING), None)


def owner_of(events: Sequence[HistoryEntry]) -> str | None:
    """Who held the deal last: its last assignment, or its reactivation after a recycle."""
    return next((e.data.get("owner") for e in reversed(events) if e.event_type in ASSIGNING),
                None)  # fmt: skip


def amount_of(events: Sequence[HistoryEntry]) -> str | None:
    for e in reversed(events):
        if e.event_type == "OpportunityAmountChanged":
            return str(e.data["amount"]["amount"])
        if e.event_type == "OpportunityOpened" and e.data.get("amount"):
            return str(e.data["amount"]["amount"])
    return None


def audit_show(
    app: PipelineApp, opportunity_id: uuid.UUID, as_of: datetime | None
) -> dict[str, Any]:
    """One opportunity's state and history as at `as_of` (now when None)."""
    state = app.get(opportunity_id, as_of)
    events = [HistoryEntry.of(e) for e in app.history(opportunity_id)
              if as_of is None or e.timestamp <= as_of]  # fmt: skip
    return {
        "state": OpportunityView.of(state, as_of).model_dump(mode="json"),
        "history": [e.model_dump(mode="json") for e in events],
    }


# -- output --------------------------------------------------------------------------------------


def as_table(report: dict[str, Any]) -> str:
    lines = []
    for d in report["deals"]:
        who = f"{d['team'] or '-'}/{d['owner'] or '-'}"
        lines.append(f"{d['opportunity_id']}  {d['title']}  [{who}]"
                     f"  lost {utc_iso(d['lost_at'])} at {d['stage']}: {d['reason']}"
                     f"  amount {d['amount'] or '-'}")  # fmt: skip
        days = ", ".join(f"{s} {n:g}d" for s, n in d["stage_days"].items())
        lines.append(f"  time in stage: {days}")
        for finding in d["findings"]:
            lines.append(f"  ! {finding}")
        for e in d["timeline"]:
            lines.append(f"    {utc_iso(e['at'])}  {e['source']:<12} {e['type']:<28}"
                         f" {e['actor']:<12} {e['detail']}")  # fmt: skip
        lines.append("")
    s = report["summary"]
    lines.append(f"{s['lost']} lost deal(s)")
    for title, key in (
        ("by reason", "by_reason"),
        ("by stage", "by_stage"),
        ("by team", "by_team"),
    ):
        lines.append(f"  {title}: " + ", ".join(f"{k} {v}" for k, v in s[key].items()))
    return "\n".join(lines)


def as_csv(report: dict[str, Any]) -> str:
    out = io.StringIO()
    columns = ["opportunity_id", "title", "company", "team", "owner", "lost_at", "reason",
               "competitor", "stage", "amount", "stage_days", "findings"]  # fmt: skip
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for d in report["deals"]:
        row = jsonable(d)
        row["stage_days"] = " ".join(f"{s}={n}" for s, n in d["stage_days"].items())
        row["findings"] = "; ".join(d["findings"])
        writer.writerow(row)
    return out.getvalue()
