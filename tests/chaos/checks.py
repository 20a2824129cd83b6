"""What the stores hold after the run, read with plain SQL, and the counts that must be zero."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from tests.chaos.bus import StreamWatch


@dataclass
class Stores:
    """Pipeline's opportunities (id -> lead, version) and how far notify and reporting got."""

    opportunities: dict[str, tuple[str, int]]
    leads: dict[str, list[str]]  # lead -> its opportunities
    event_versions: dict[str, int]  # from pipeline's event store itself
    notify: dict[str, int]
    reporting: dict[str, int]
    gaps: dict[str, int]

    def behind(self, positions: dict[str, int]) -> int:
        """Versions of the store's opportunities not (yet) applied by a consumer."""
        return sum(max(0, v - positions.get(o, 0)) for o, (_, v) in self.opportunities.items())


async def read_stores(db: asyncpg.Connection) -> Stores:
    rows = await db.fetch("SELECT opportunity_id, lead_id, version FROM pipeline.opportunity_index")
    opportunities = {str(r["opportunity_id"]): (str(r["lead_id"]), r["version"]) for r in rows}
    leads: dict[str, list[str]] = defaultdict(list)
    for opportunity, (lead, _) in opportunities.items():
        leads[lead].append(opportunity)
    versions = await db.fetch(
        "SELECT originator_id, max(originator_version) AS v FROM pipeline.pipeline_events"
        " WHERE originator_id = ANY($1::uuid[]) GROUP BY originator_id",
        [uuid.UUID(o) for o in opportunities],
    )

    async def positions(schema: str) -> dict[str, int]:
        found = await db.fetch(f"SELECT stream_id, version FROM {schema}.stream_position")
        return {str(r["stream_id"]): r["version"] for r in found}

    return Stores(
        opportunities=opportunities,
        leads=dict(leads),
        event_versions={str(r["originator_id"]): r["v"] for r in versions},
        notify=await positions("notify"),
        reporting=await positions("reporting"),
        gaps={
            s: await db.fetchval(f"SELECT count(*) FROM {s}.stream_gap")
            for s in ("notify", "reporting")
        },
    )


async def reminder_records(db: asyncpg.Connection, last_tick: datetime) -> dict[str, int]:
    """Notify's own records of what it issued and sent."""
    return {
        "issued": await db.fetchval(
            "SELECT count(*) FROM notify.notification WHERE opportunity_id IS NOT NULL"
        ),
        "issued twice": await db.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM notify.notification"
            " WHERE opportunity_id IS NOT NULL"
            " GROUP BY opportunity_id, kind, payload->>'due_at', recipient"
            " HAVING count(*) > 1) twice"
        ),
        "sent": await db.fetchval("SELECT count(*) FROM notify.delivery WHERE status = 'sent'"),
        "sent by two attempts": await db.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM notify.delivery_attempt WHERE ok"
            " GROUP BY delivery_id HAVING count(*) > 1) twice"
        ),
        "pending": await db.fetchval(
            "SELECT count(*) FROM notify.delivery WHERE status = 'pending'"
        ),
        "pending, leased by a killed notify": await db.fetchval(
            "SELECT count(*) FROM notify.delivery WHERE status = 'pending'"
            " AND claimed_until > now()"
        ),
        "due and not fired": await db.fetchval(
            "SELECT count(*) FROM notify.timer WHERE fired_at IS NULL AND due_at <= $1",
            last_tick,
        ),
    }


@dataclass
class NotificationWatch:
    """The reminders on `notification.events.v1`: distinct notifications per reminder (its
    opportunity, kind, due time and recipient), and copies of one notification."""

    seen: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # notification id -> reminder
    copies: int = 0

    def take(self, record: Any) -> None:
        data = json.loads(record.value)["data"]
        if data["notification_id"] in self.seen:
            self.copies += 1
            return
        if data.get("opportunity_id") is not None:
            reminder = (data["opportunity_id"], data["kind"], data.get("due_at"),
                        data["recipient"])  # fmt: skip
            self.seen[data["notification_id"]] = reminder

    def twice(self) -> int:
        per: dict[tuple[Any, ...], int] = defaultdict(int)
        for reminder in self.seen.values():
            per[reminder] += 1
        return sum(1 for n in per.values() if n > 1)


def verify_reporting(env: dict[str, str]) -> tuple[int, list[dict[str, Any]], str]:
    """`dealstream replay reporting --verify`: (exit code, differences, what went wrong)."""
    done = subprocess.run([sys.executable, "-m", "services.cli", "replay", "reporting",
                           "--verify"], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    try:
        answer = json.loads(done.stdout)
    except ValueError:
        return done.returncode, [], done.stderr[-2000:]
    return done.returncode, list(answer.get("differences", [])), ""


def bus_counts(stores: Stores, live: StreamWatch, fresh: StreamWatch) -> dict[str, int]:
    """Gap-freedom on `opportunity.events.v1` as the module docstring of tests.chaos states it."""
    missing = sum(
        max(0, version - fresh.applied.get(opportunity, 0))
        for opportunity, (_, version) in stores.opportunities.items()
    )
    return {
        "gaps met by a subscriber following the whole run": len(live.gaps),
        "copies that differ from the version they repeat": live.conflicts + fresh.conflicts,
        "versions missing on the final broker": missing,
        "stream_gap alarms (notify, reporting)": sum(stores.gaps.values()),
        "versions notify has not applied": stores.behind(stores.notify),
        "versions reporting has not applied": stores.behind(stores.reporting),
    }


def opportunity_counts(stores: Stores, accepted: dict[str, uuid.UUID]) -> dict[str, int]:
    leads = {str(lead) for lead in accepted.values()}
    store_differs = sum(
        1 for o, (_, v) in stores.opportunities.items() if stores.event_versions.get(o) != v
    )
    return {
        "accepted leads without an opportunity": sum(
            1 for lead in leads if lead not in stores.leads
        ),
        "accepted leads with more than one": sum(
            1 for lead in leads if len(stores.leads.get(lead, [])) > 1
        ),
        "opportunities of no accepted lead": sum(1 for lead in stores.leads if lead not in leads),
        "index and event store disagree": store_differs,
    }


def command_counts(acknowledged: list[tuple[uuid.UUID, int, str]], fresh: StreamWatch) -> int:
    """Acknowledged stage changes not on the bus at the version pipeline answered with."""
    return sum(
        1
        for opportunity, version, stage in acknowledged
        if fresh.events.get((str(opportunity), version), ("", None))[:2]
        != ("OpportunityStageChanged", stage)
    )
