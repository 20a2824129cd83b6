"""Pipeline's use cases over its event store: opportunities opened from lead events exactly once,
commands with optimistic concurrency, history and time travel, recycling of idle deals. The
opportunity index (for lists, scoping and routing load) is written in the same transaction as the
events it reflects."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError
from psycopg.sql import SQL

from services.pipeline.domain import Opportunity, Refused, opportunity_id_for
from services.pipeline.rules import route
from shared.bus.consumer import record_tracked
from shared.contracts.envelope import Envelope
from shared.contracts.events import LeadCaptured, LeadMerged
from shared.settings import Rules
from shared.store.eventstore import EventStoreApp
from shared.store.migrations import BUS_TABLES, Migration
from shared.store.recorder import SideWrite

SCHEMA = "pipeline"
MIGRATIONS: list[Migration] = [
    BUS_TABLES,
    (
        2,
        """
        CREATE TABLE opportunity_index (
            opportunity_id uuid PRIMARY KEY,
            lead_id uuid NOT NULL,
            version integer NOT NULL,
            status text NOT NULL,
            stage char(1) NOT NULL,
            probability integer NOT NULL,
            owner text,
            team text,
            region text,
            industry text,
            partner_id text,
            source text NOT NULL,
            tier text NOT NULL,
            grade char(1) NOT NULL,
            amount numeric(18, 2),
            currency char(3),
            title text NOT NULL,
            opened_at timestamptz NOT NULL,
            last_activity_at timestamptz NOT NULL
        );
        CREATE INDEX opportunity_index_owner ON opportunity_index (owner, status);
        CREATE INDEX opportunity_index_team ON opportunity_index (team, status);
        CREATE INDEX opportunity_index_idle ON opportunity_index (status, last_activity_at);
        CREATE TABLE opportunity_lead (
            lead_id uuid PRIMARY KEY,
            opportunity_id uuid NOT NULL
        );
        CREATE TABLE refused_command (
            id bigserial PRIMARY KEY,
            opportunity_id uuid NOT NULL,
            command text NOT NULL,
            code text NOT NULL,
            actor text NOT NULL,
            detail jsonb NOT NULL DEFAULT '{}',
            refused_at timestamptz NOT NULL
        );
        CREATE INDEX refused_command_opportunity ON refused_command (opportunity_id);
        """,
    ),
]

INDEX_COLUMNS = (
    "opportunity_id", "lead_id", "version", "status", "stage", "probability", "owner", "team",
    "region", "industry", "partner_id", "source", "tier", "grade", "amount", "currency", "title",
    "opened_at", "last_activity_at",
)  # fmt: skip


@dataclass(frozen=True)
class Command:
    """One command on one opportunity: `authorize` raises for a caller who may not, `change`
    applies it (raising Refused when the rules refuse)."""

    opportunity_id: uuid.UUID
    expected_version: int
    change: Callable[[Opportunity], None]
    authorize: Callable[[Opportunity], None] = lambda _: None
    correlation_id: str = ""


class StaleVersion(Exception):
    def __init__(self, current: int) -> None:
        super().__init__(f"stale expected_version; current version is {current}")
        self.current = current


class NotFound(Exception):
    pass


class MergeTargetPending(Exception):
    """A merged lead arrived before the opportunity of the lead it joins: try again later."""


def index_row(o: Opportunity) -> tuple[Any, ...]:
    return (
        o.id, o.lead_id, o.version, o.status, o.stage, o.probability, o.owner, o.team, o.region,
        o.industry, o.partner_id, o.source, o.tier, o.grade,
        o.amount.amount if o.amount else None, o.amount.currency if o.amount else None,
        o.title, o.opened_at, o.last_activity_at,
    )  # fmt: skip


class PipelineApp(EventStoreApp):
    name = "Pipeline"

    def index_writes(self, opportunities: Sequence[Aggregate]) -> list[SideWrite]:
        """The index rows of these opportunities, for the transaction that stores their events."""
        opportunities = [o for o in opportunities if isinstance(o, Opportunity)]
        columns = ", ".join(INDEX_COLUMNS)
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in INDEX_COLUMNS[2:])
        upsert = SQL(
            "INSERT INTO {table} ("
            + columns
            + ") VALUES ("
            + ", ".join(["%s"] * len(INDEX_COLUMNS))
            + ") ON CONFLICT (opportunity_id) DO UPDATE SET "
            + updates
            + " WHERE {table}.version < EXCLUDED.version"
        ).format(table=self.table("opportunity_index"))
        leads = SQL(
            "INSERT INTO {table} (lead_id, opportunity_id) VALUES (%s, %s) ON CONFLICT DO NOTHING"
        ).format(table=self.table("opportunity_lead"))
        # Lead rows only where leads were added (opened, attached), not on every command.
        joined = [
            o
            for o in opportunities
            if any(isinstance(e, Opportunity.Opened | Opportunity.LeadAttached)
                   for e in o.pending_events)
        ]  # fmt: skip
        return [
            (upsert, [index_row(o) for o in opportunities]),
            (leads, [(lead, o.id) for o in joined for lead in o.lead_ids]),
        ]

    def save(self, opportunities: Sequence[Opportunity], **tracking: Any) -> None:
        self.record(opportunities, side_writes=self.index_writes(opportunities), **tracking)

    def owner_loads(self) -> dict[str, int]:
        rows = self.query(
            SQL(
                "SELECT owner, count(*) AS n FROM {} WHERE status = 'open' AND owner IS NOT NULL"
                " GROUP BY owner"
            ).format(self.table("opportunity_index"))
        )
        return {row["owner"]: int(row["n"]) for row in rows}

    def apply_lead_events(
        self, tracking_name: str, items: Sequence[tuple[int, Envelope]], rules: Rules
    ) -> int:
        """Open an opportunity per captured lead (scored, tiered, routed); attach merged leads
        to the opportunity of the lead they were merged into. Exactly once per upstream event."""

        def decide(envelopes: list[Envelope]) -> list[Aggregate]:
            captured = {
                e.event_id: LeadCaptured.model_validate(e.data)
                for e in envelopes
                if e.event_type == "LeadCaptured"
            }
            known = self.existing_ids([opportunity_id_for(c.lead_id) for c in captured.values()])
            loads = self.owner_loads() if captured else {}
            changed: dict[uuid.UUID, Opportunity] = {}
            for envelope in envelopes:
                if envelope.event_type == "LeadCaptured":
                    lead = captured[envelope.event_id]
                    opportunity_id = opportunity_id_for(lead.lead_id)
                    if opportunity_id in known or lead.duplicate_of is not None:
                        continue  # seen, or a known customer: its LeadMerged attaches it
                    known.add(opportunity_id)
                    assignment = route(lead, rules.directory, rules.routing, loads)
                    if assignment.owner:
                        loads[assignment.owner] = loads.get(assignment.owner, 0) + 1
                    changed[opportunity_id] = Opportunity.open_from_lead(
                        lead, rules, assignment, str(envelope.event_id), envelope.correlation_id
                    )
                elif envelope.event_type == "LeadMerged":
                    merged = LeadMerged.model_validate(envelope.data)
                    target_id = opportunity_id_for(merged.into_lead_id)
                    if target_id not in changed:
                        target_id = self.opportunity_of_lead(merged.into_lead_id)
                    if target_id is None:
                        # The customer's first lead is on another partition and not opened yet:
                        # fail the batch, so it is read again (nothing is tracked past it).
                        raise MergeTargetPending(merged.into_lead_id)
                    target = changed.get(target_id) or self.repository.get(target_id)
                    with target.acting(envelope.correlation_id, str(envelope.event_id)):
                        target.attach_lead(merged.lead_id, merged.rule, merged.merged_at)
                    changed[target_id] = target
            return list(changed.values())

        return record_tracked(self, tracking_name, items, decide, self.index_writes)

    def opportunity_of_lead(self, lead_id: uuid.UUID) -> uuid.UUID | None:
        rows = self.query(
            SQL("SELECT opportunity_id FROM {} WHERE lead_id = %s").format(
                self.table("opportunity_lead")
            ),
            [lead_id],
        )
        if rows:
            return uuid.UUID(str(rows[0]["opportunity_id"]))
        candidate = opportunity_id_for(lead_id)
        return candidate if self.existing_ids([candidate]) else None

    def get(self, opportunity_id: uuid.UUID, as_of: datetime | None = None) -> Opportunity:
        """The opportunity now, or as it was at `as_of` (rebuilt from its stream)."""
        try:
            if as_of is None:
                return self.repository.get(opportunity_id)
            version = 0
            for event in self.events.get(opportunity_id):
                if event.timestamp > as_of:
                    break
                version = event.originator_version
            if version == 0:
                raise NotFound(f"opportunity {opportunity_id} did not exist at {as_of}")
            return self.repository.get(opportunity_id, version=version)
        except NotFound:
            raise
        except Exception as exc:
            if type(exc).__name__ == "AggregateNotFoundError":
                raise NotFound(f"no opportunity {opportunity_id}") from exc
            raise

    def history(self, opportunity_id: uuid.UUID) -> list[Any]:
        events = list(self.events.get(opportunity_id))
        if not events:
            raise NotFound(f"no opportunity {opportunity_id}")
        return events

    def command(
        self,
        opportunity_id: uuid.UUID,
        expected_version: int,
        change: Callable[[Opportunity], None],
        authorize: Callable[[Opportunity], None] = lambda _: None,
        correlation_id: str = "",
    ) -> Opportunity:
        """Apply one command with optimistic concurrency: `authorize` first (it raises for a
        caller who may not), then a stale `expected_version`, or a writer who got there first,
        is StaleVersion with the current version; refusals are Refused."""
        command = Command(opportunity_id, expected_version, change, authorize, correlation_id)
        outcome = self.commands([command])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def commands(self, commands: Sequence[Command]) -> list[Opportunity | Exception]:
        """Commands on distinct opportunities, stored in one transaction (one table lock, one
        commit): each outcome is the opportunity as stored, or what refused that command alone
        (as `command` raises it). If another writer stored first for any of them, each is run
        again on its own, so that only the one it concerns is stale."""
        outcomes: list[Opportunity | Exception] = []
        for command in commands:
            try:
                outcomes.append(self._decide(command))
            except Exception as exc:
                outcomes.append(exc)
        decided = [o for o in outcomes if isinstance(o, Opportunity)]
        if not decided:
            return outcomes
        try:
            self.save(decided)
        except IntegrityError:
            if len(commands) == 1:
                return [StaleVersion(self.get(commands[0].opportunity_id).version)]
            return [
                self.commands([command])[0] if isinstance(outcome, Opportunity) else outcome
                for command, outcome in zip(commands, outcomes, strict=True)
            ]
        return outcomes

    def _decide(self, command: Command) -> Opportunity:
        opportunity = self.get(command.opportunity_id)
        command.authorize(opportunity)
        if opportunity.version != command.expected_version:
            raise StaleVersion(opportunity.version)
        with opportunity.acting(command.correlation_id):
            command.change(opportunity)
        return opportunity

    def recycle_idle(self, now: datetime, rules: Rules, limit: int = 500) -> list[uuid.UUID]:
        """Recycle open opportunities idle for `recycle_days` as of `now`; returns their ids."""
        cutoff = now - timedelta(days=rules.recycle_days)
        rows = self.query(
            SQL(
                "SELECT opportunity_id FROM {} WHERE status = 'open' AND last_activity_at <= %s"
                " ORDER BY last_activity_at LIMIT %s"
            ).format(self.table("opportunity_index")),
            [cutoff, limit],
        )
        recycled: list[Opportunity] = []
        for row in rows:
            opportunity = self.repository.get(row["opportunity_id"])
            try:
                with opportunity.acting(f"tick:{now.isoformat()}"):
                    opportunity.recycle(now, rules)
            except Refused:
                continue  # the index lagged: it is active after all
            recycled.append(opportunity)
        if recycled:
            self.save(recycled)
        return [o.id for o in recycled]
