"""Pipeline's use cases over its event store: opportunities opened from lead events exactly once,
commands with optimistic concurrency, history and time travel, recycling of idle deals. The
opportunity index (for lists, scoping and routing load) is written in the same transaction as the
events it reflects."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError
from psycopg.sql import SQL

from services.pipeline.domain import Opportunity, Refused, opportunity_id_for
from services.pipeline.rules import route
from shared.bus.consumer import record_tracked
from shared.contracts.envelope import Envelope
from shared.contracts.events import LeadCaptured, LeadMerged, LeadUnmerged
from shared.settings import Rules
from shared.store.eventstore import EventStoreApp
from shared.store.migrations import BUS_TABLES, Migration, event_store
from shared.store.recorder import SideWrite, as_columns, unnest_rows

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
    (
        3,
        """
        -- A merged lead whose customer's lead has no opportunity yet (it is on another
        -- partition, not read yet) waits here, and is attached when that lead gets one.
        CREATE TABLE pending_merge (
            lead_id uuid PRIMARY KEY,
            into_lead_id uuid NOT NULL,
            rule text NOT NULL,
            merged_at timestamptz NOT NULL,
            event_id text NOT NULL,
            correlation_id text NOT NULL
        );
        CREATE INDEX pending_merge_into ON pending_merge (into_lead_id);
        """,
    ),
    event_store(4, "pipeline"),
    (
        5,
        """
        -- Routing's load cap across replicas: a batch that routes deals to reps looks their
        -- loads up before its transaction, so two replicas could both give a rep its last
        -- free place. In the transaction (after every earlier writer's commit: writers of
        -- events take the events table's lock), the reps it routed to that now hold more open
        -- deals than the cap are inserted here; no row is allowed, so the insert fails the
        -- transaction, and the batch is decided again on the loads as they are.
        CREATE TABLE over_load_cap (
            owner text NOT NULL,
            CONSTRAINT routing_load_cap CHECK (false)
        );
        """,
    ),
]

INDEX_COLUMNS = (
    "opportunity_id", "lead_id", "version", "status", "stage", "probability", "owner", "team",
    "region", "industry", "partner_id", "source", "tier", "grade", "amount", "currency", "title",
    "opened_at", "last_activity_at",
)  # fmt: skip
INDEX_TYPES = (
    "uuid", "uuid", "int4", "text", "bpchar", "int4", "text", "text", "text", "text", "text",
    "text", "text", "bpchar", "numeric", "bpchar", "text", "timestamptz", "timestamptz",
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


PENDING_COLUMNS = ("lead_id", "into_lead_id", "rule", "merged_at", "event_id", "correlation_id")


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
        """The index rows of these opportunities, for the transaction that stores their events:
        one statement each for the index and the lead rows, whatever the batch's size."""
        latest: dict[uuid.UUID, Opportunity] = {}
        for o in opportunities:  # one row per opportunity (an upsert touches a row once)
            if isinstance(o, Opportunity) and (o.id not in latest or
                                               latest[o.id].version < o.version):  # fmt: skip
                latest[o.id] = o
        columns = ", ".join(INDEX_COLUMNS)
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in INDEX_COLUMNS[2:])
        upsert = SQL(
            "INSERT INTO {table} (" + columns + ") " + unnest_rows(INDEX_TYPES)
            + " ON CONFLICT (opportunity_id) DO UPDATE SET " + updates
            + " WHERE {table}.version < EXCLUDED.version"
        ).format(table=self.table("opportunity_index"))  # fmt: skip
        leads = SQL(  # a lead unmerged moves to the deal it opens
            "INSERT INTO {table} (lead_id, opportunity_id) " + unnest_rows(("uuid", "uuid"))
            + " ON CONFLICT (lead_id) DO UPDATE SET opportunity_id = EXCLUDED.opportunity_id"
            " WHERE {table}.opportunity_id <> EXCLUDED.opportunity_id"
        ).format(table=self.table("opportunity_lead"))  # fmt: skip
        # Lead rows only where leads were added (opened, attached), not on every command.
        joined = [
            o
            for o in latest.values()
            if any(isinstance(e, Opportunity.Opened | Opportunity.LeadAttached)
                   for e in o.pending_events)
        ]  # fmt: skip
        return [
            (upsert, as_columns([index_row(o) for o in latest.values()])),
            (leads, as_columns([(lead, o.id) for o in joined for lead in o.lead_ids])),
        ]

    def save(self, opportunities: Sequence[Opportunity]) -> None:
        self.record(opportunities, side_writes=self.index_writes(opportunities))

    def owner_loads(self, owners: Sequence[str]) -> dict[str, int]:
        """Open opportunities held by each of `owners` (the reps routing may pick): an index
        range per owner, whatever the number of opportunities held by nobody or by others."""
        if not owners:
            return {}
        rows = self.query(
            SQL(
                "SELECT owner, count(*) AS n FROM {} WHERE owner = ANY(%b::text[])"
                " AND status = 'open' GROUP BY owner"
            ).format(self.table("opportunity_index")),
            (list(owners),),
        )
        return {row["owner"]: int(row["n"]) for row in rows}

    def apply_lead_events(
        self, tracking_name: str, items: Sequence[tuple[int, Envelope]], rules: Rules
    ) -> int:
        """Open an opportunity per captured lead (scored, tiered, routed); attach merged leads
        to the opportunity of the lead they were merged into. Exactly once per upstream event."""
        return self.apply_tracked_lead_events([(tracking_name, i, e) for i, e in items], rules)

    def apply_tracked_lead_events(
        self, items: Sequence[tuple[str, int, Envelope]], rules: Rules
    ) -> int:
        """`apply_lead_events` for events of one or more upstreams (a fetch's partitions), each
        (upstream, notification id, envelope), applied in one transaction."""

        pending: list[SideWrite] = []
        routed: set[str] = set()  # the reps this batch routed deals to

        def decide(envelopes: list[Envelope]) -> list[Aggregate]:
            pending.clear()  # decide runs again when a concurrent writer won a race
            routed.clear()
            captured = {
                e.event_id: cast(LeadCaptured, e.contract())
                for e in envelopes
                if e.event_type == "LeadCaptured"
            }
            ids = {event_id: opportunity_id_for(c.lead_id) for event_id, c in captured.items()}
            unmerging = [opportunity_id_for(uuid.UUID(str(e.data.get("lead_id"))))
                         for e in envelopes if e.event_type == "LeadUnmerged"]  # fmt: skip
            known = self.existing_ids([*ids.values(), *unmerging])
            reps = [rep.id for rep in rules.directory.reps()] if captured or unmerging else []
            loads = self.owner_loads(reps)  # {} without reps
            changed: dict[uuid.UUID, Opportunity] = {}
            home: dict[uuid.UUID, uuid.UUID] = {}  # lead -> opportunity, for this batch
            waiting: list[tuple[Any, ...]] = []
            settled: list[uuid.UUID] = []

            attach = self._attacher(changed, home)

            def open_deal(lead: LeadCaptured, opportunity_id: uuid.UUID, envelope: Envelope,
                          opened_at: datetime | None = None) -> None:  # fmt: skip
                """Open the lead's deal, routed to the least loaded rep of its team."""
                known.add(opportunity_id)
                assignment = route(lead, rules.directory, rules.routing, loads)
                if assignment.owner:
                    loads[assignment.owner] = loads.get(assignment.owner, 0) + 1
                    routed.add(assignment.owner)
                changed[opportunity_id] = Opportunity.open_from_lead(
                    lead, rules, assignment, str(envelope.event_id), envelope.correlation_id,
                    opportunity_id, opened_at,
                )  # fmt: skip
                home[lead.lead_id] = opportunity_id

            for envelope in envelopes:
                if envelope.event_type == "LeadCaptured":
                    lead = captured[envelope.event_id]
                    opportunity_id = ids[envelope.event_id]
                    if opportunity_id in known or lead.duplicate_of is not None:
                        continue  # seen, or a known customer: its LeadMerged attaches it
                    open_deal(lead, opportunity_id, envelope)
                elif envelope.event_type == "LeadMerged":
                    merged = cast(LeadMerged, envelope.contract())
                    target_id = home.get(merged.into_lead_id) or self.opportunity_of_lead(
                        merged.into_lead_id
                    )
                    if target_id is None:
                        # The customer's first lead is on another partition and not opened yet:
                        # the merge waits for it instead of holding up this partition.
                        waiting.append((merged.lead_id, merged.into_lead_id, merged.rule,
                                        merged.merged_at, str(envelope.event_id),
                                        envelope.correlation_id))  # fmt: skip
                        continue
                    attach(target_id, merged.lead_id, merged.rule, merged.merged_at,
                           str(envelope.event_id), envelope.correlation_id)  # fmt: skip
                elif envelope.event_type == "LeadUnmerged":
                    unmerged = cast(LeadUnmerged, envelope.contract())
                    own = opportunity_id_for(unmerged.lead_id)
                    if own in known:
                        continue  # its own deal is open already
                    waiting[:] = [w for w in waiting if w[0] != unmerged.lead_id]
                    settled.append(unmerged.lead_id)  # a merge of it still waiting: dropped
                    joined = home.get(unmerged.lead_id) or self.opportunity_of_lead(
                        unmerged.lead_id
                    )
                    if joined is not None and joined != own:
                        left = changed.get(joined) or self.repository.get(joined)
                        with left.acting(envelope.correlation_id, str(envelope.event_id)):
                            left.detach_lead(unmerged.lead_id, own, unmerged.actor,
                                             unmerged.unmerged_at)  # fmt: skip
                        changed[joined] = left
                    open_deal(unmerged.lead, own, envelope, unmerged.unmerged_at)
            # Leads that found a home may be what earlier merges were waiting for (in turn); and
            # a merge that started waiting while another batch (another replica's, or a
            # partition handled alone after a failure) was opening its customer (neither saw
            # the other's uncommitted rows) is settled by the next batch.
            settled += self._settle(home, waiting, attach)
            pending.extend(self._pending_writes([w for w in waiting if w[0] not in home], settled))
            return list(changed.values())

        def side_writes(aggregates: Sequence[Aggregate]) -> list[SideWrite]:
            return [*self.index_writes(aggregates), *pending,
                    *self._load_cap_guard(sorted(routed), rules.routing.load_cap)]  # fmt: skip

        return record_tracked(self, items, decide, side_writes)

    def _load_cap_guard(self, owners: Sequence[str], cap: int) -> list[SideWrite]:
        """Fails the transaction if a rep it routed deals to holds more open deals than `cap`
        once its index rows are written (migration 5, `over_load_cap`): last of its writes."""
        guard = SQL(
            "INSERT INTO {guard} (owner) SELECT owner FROM {index}"
            " WHERE owner = ANY(%b::text[]) AND status = 'open' GROUP BY owner"
            " HAVING count(*) > %b::int8"
        ).format(guard=self.table("over_load_cap"), index=self.table("opportunity_index"))
        return [(guard, [(list(owners), cap)])] if owners else []

    def _pending_writes(
        self, waiting: Sequence[tuple[Any, ...]], settled: Sequence[uuid.UUID]
    ) -> list[SideWrite]:
        """Merges that start waiting, and those settled, each as one statement."""
        table = self.table("pending_merge")
        types = ("uuid", "uuid", "text", "timestamptz", "text", "text")
        insert = SQL("INSERT INTO {} (" + ", ".join(PENDING_COLUMNS) + ") " + unnest_rows(types)
                     + " ON CONFLICT DO NOTHING").format(table)  # fmt: skip
        delete = SQL("DELETE FROM {} WHERE lead_id = ANY(%b::uuid[])").format(table)
        return [(insert, as_columns(waiting)), (delete, [(list(settled),)] if settled else [])]

    def _attacher(
        self, changed: dict[uuid.UUID, Opportunity], home: dict[uuid.UUID, uuid.UUID]
    ) -> Callable[[uuid.UUID, uuid.UUID, str, datetime, str, str], None]:
        """Attach a merged lead to an opportunity (loaded once per batch, changed in place)."""

        def attach(opportunity_id: uuid.UUID, lead_id: uuid.UUID, rule: str, at: datetime,
                   event_id: str, correlation_id: str) -> None:  # fmt: skip
            target = changed.get(opportunity_id) or self.repository.get(opportunity_id)
            with target.acting(correlation_id, event_id):
                target.attach_lead(lead_id, rule, at)
            changed[opportunity_id] = target
            home[lead_id] = opportunity_id

        return attach

    def _settle(
        self,
        home: dict[uuid.UUID, uuid.UUID],
        waiting: Sequence[tuple[Any, ...]],
        attach: Callable[[uuid.UUID, uuid.UUID, str, datetime, str, str], None],
    ) -> list[uuid.UUID]:
        """Attach every waiting merge whose customer's lead now has an opportunity — in this
        batch (`home`) or stored — following chains of merges; the leads settled."""
        # Every waiting merge in one read (the table holds only merges whose customer is not
        # opened yet: few), followed through in memory, not a query per link of a chain.
        stored = self.query(
            SQL("SELECT p.*, l.opportunity_id FROM {} p LEFT JOIN {} l"
                " ON l.lead_id = p.into_lead_id").format(
                self.table("pending_merge"), self.table("opportunity_lead")),
        )  # fmt: skip
        waiting_for: dict[uuid.UUID, list[dict[str, Any]]] = {}
        for row in stored:
            if row["opportunity_id"] is not None:
                home.setdefault(row["into_lead_id"], row["opportunity_id"])
            waiting_for.setdefault(row["into_lead_id"], []).append(row)
        for w in waiting:
            waiting_for.setdefault(w[1], []).append(dict(zip(PENDING_COLUMNS, w, strict=True)))
        settled: list[uuid.UUID] = []
        homed = set(home)
        while homed:
            rows = [row for lead in homed for row in waiting_for.get(lead, ())]
            homed = set()
            for row in rows:
                if row["lead_id"] in home:
                    continue
                attach(home[row["into_lead_id"]], row["lead_id"], row["rule"], row["merged_at"],
                       row["event_id"], row["correlation_id"])  # fmt: skip
                settled.append(row["lead_id"])
                homed.add(row["lead_id"])
        return settled

    def settle_pending_merges(self) -> list[uuid.UUID]:
        """The scheduler's sweep for a quiet time: attach waiting merges whose customer got an
        opportunity since (a batch on another partition opened it while they started waiting)."""
        for _attempt in range(3):
            changed: dict[uuid.UUID, Opportunity] = {}
            home: dict[uuid.UUID, uuid.UUID] = {}
            settled = self._settle(home, [], self._attacher(changed, home))
            if not settled:
                return []
            writes = [*self.index_writes(list(changed.values())),
                      *self._pending_writes([], settled)]  # fmt: skip
            try:
                self.record(changed.values(), side_writes=writes)
                return settled
            except IntegrityError:
                continue  # a lead batch attached some of them first: look again
        return []

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
        """Commands on distinct opportunities, stored in one transaction (one write lock, one
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
