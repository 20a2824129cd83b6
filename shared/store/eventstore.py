"""The event-store application base: an `eventsourcing` Application on PostgreSQL whose recorder
is a process recorder, so a save can carry the upstream position (Tracking) in the same
transaction as the new events. The library's protected `_record` is called here and only here."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from eventsourcing.application import Application, ProcessingEvent
from eventsourcing.domain import Aggregate, DomainEventProtocol
from eventsourcing.persistence import (
    Notification,
    ProcessRecorder,
    StoredEvent,
    Tracking,
    Transcoder,
)
from psycopg.sql import SQL, Composable, Composed, Identifier

from shared.store.db import eventsourcing_env
from shared.store.recorder import SideWrite
from shared.store.transcoder import OrjsonTranscoder


class EventStoreApp(Application[uuid.UUID]):
    """Base of the capture and pipeline stores. `name` sets the table prefix."""

    def __init__(self, dsn: str, schema: str, pool_size: int = 5) -> None:
        self.schema = schema
        super().__init__(env=eventsourcing_env(dsn, schema, pool_size))

    def construct_transcoder(self) -> Transcoder:
        transcoder = OrjsonTranscoder()
        self.register_transcodings(transcoder)
        return transcoder

    def construct_recorder(self) -> ProcessRecorder:
        return self.factory.process_recorder()

    @property
    def process_recorder(self) -> ProcessRecorder:
        recorder = self.recorder
        assert isinstance(recorder, ProcessRecorder)
        return recorder

    def record(
        self,
        aggregates: Iterable[Aggregate],
        trackings: Sequence[Tracking] = (),
        side_writes: Sequence[SideWrite] = (),
    ) -> None:
        """Store the pending events of all given aggregates, the upstream positions if any (one
        per upstream: a consumer's partitions), and the service's index rows, in one
        transaction. A repeated or lower position, or an aggregate version someone else stored
        first, raises IntegrityError."""
        processing = ProcessingEvent[uuid.UUID]()
        # What the library's collect_events does, without its two runtime Protocol checks per
        # aggregate (a fifth of a 500-lead batch's Python time, measured here).
        for aggregate in aggregates:
            processing.events.extend(aggregate.collect_events())
            processing.aggregates[aggregate.id] = aggregate
        processing.saved_kwargs["side_writes"] = side_writes
        processing.saved_kwargs["trackings"] = trackings
        if processing.events or trackings:
            self._record(processing)  # no Recordings: the recorder returns no ids

    def tracked_position(self, name: str) -> int:
        return self.tracked_positions([name])[name]

    def tracked_positions(self, names: Iterable[str]) -> dict[str, int]:
        """The recorded position of each upstream (0 where none is): one query for them all."""
        names = list(dict.fromkeys(names))
        recorder: Any = self.process_recorder
        rows = self.query(
            SQL(
                "SELECT application_name, notification_id FROM {}.{}"
                " WHERE application_name = ANY(%b::text[])"
            ).format(Identifier(self.schema), Identifier(recorder.tracking_table_name)),
            [names],
        )
        found = {row["application_name"]: row["notification_id"] for row in rows}
        return {name: found.get(name) or 0 for name in names}

    def notifications_after(self, position: int, limit: int) -> Sequence[Notification]:
        return self.process_recorder.select_notifications(
            start=position, limit=limit, inclusive_of_start=False
        )

    def to_events(
        self, notifications: Sequence[StoredEvent]
    ) -> list[DomainEventProtocol[uuid.UUID]]:
        """A page of the notification log as domain events: what the relay, replays and exports
        read. A store whose events need more than the mapper (capture opens sealed contacts)
        does it here, once per page."""
        return [self.mapper.to_domain_event(n) for n in notifications]

    def existing_ids(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """Which of these aggregates already have events: one query for a whole batch."""
        if not ids:
            return set()
        # A probe of the primary key per id, whatever the planner believes of the table: on a
        # table not analyzed lately (a store growing fast, or one whose inserts took the
        # library's EXCLUSIVE table lock, which kept autovacuum from it), `originator_id =
        # ANY(...)` was planned as a scan of the whole table (86 ms a batch at 600,000 events,
        # growing with the store; 1 ms this way).
        statement = SQL(
            "SELECT u.id AS originator_id FROM unnest(%b::uuid[]) AS u(id)"
            " WHERE EXISTS (SELECT 1 FROM {schema}.{table} e WHERE e.originator_id = u.id)"
        ).format(schema=Identifier(self.schema), table=Identifier(f"{self.name.lower()}_events"))
        return {row["originator_id"] for row in self.query(statement, [list(ids)])}

    def events_of(
        self, ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, list[DomainEventProtocol[uuid.UUID]]]:
        """Every event of these aggregates, in order: one query for a whole page of streams
        (what audits and exports read, instead of a query per stream)."""
        if not ids:
            return {}
        # One index range per stream (OFFSET 0 keeps the lateral subquery a probe, not a join
        # the planner may turn into a scan of the table: see existing_ids).
        statement = SQL(
            "SELECT e.originator_id, e.originator_version, e.topic, e.state"
            " FROM unnest(%b::uuid[]) AS u(id) CROSS JOIN LATERAL (SELECT * FROM {schema}.{table}"
            " x WHERE x.originator_id = u.id OFFSET 0) e"
            " ORDER BY e.originator_id, e.originator_version"
        ).format(schema=Identifier(self.schema), table=Identifier(f"{self.name.lower()}_events"))
        found: dict[uuid.UUID, list[DomainEventProtocol[uuid.UUID]]] = {i: [] for i in ids}
        stored = [
            StoredEvent(row["originator_id"], row["originator_version"], row["topic"],
                        bytes(row["state"]))
            for row in self.query(statement, [list(found)])  # each id once
        ]  # fmt: skip
        for event in self.to_events(stored):  # as the store reads them (capture opens contacts)
            found[event.originator_id].append(event)
        return found

    def query(
        self, statement: Composable | str, params: Sequence[Any] = ()
    ) -> list[dict[str, Any]]:
        """Read the service's own tables through the store's connection pool. Planned for its
        values each time, never prepared: psycopg prepares a statement from its sixth run, and
        PostgreSQL may then keep one plan for all values. A plan made in a table's first, small
        minutes can scan it whole until autovacuum next analyzes it (measured on the read
        models' lookups: shared.bus.consumer._apply_once). A precaution here, not measured alone.

        Lists go as `%b::type[]` (here and in side writes): psycopg writes a binary array, each
        element's bytes and length. As `%s`, a text or uuid list becomes an array literal, each
        element checked and escaped for quoting with a regular expression: 2.6 ms for the 1,500
        keys of one capture batch against 0.25 ms in binary, and 1.7 ms against 0.24 ms for
        1,500 uuids (measured here). The cast stays: an empty list goes as an untyped `'{}'`."""
        datastore: Any = getattr(self.recorder, "datastore")  # noqa: B009
        with datastore.transaction(commit=False) as cursor:
            cursor.execute(statement, params, prepare=False)
            return list(cursor.fetchall())

    def table(self, name: str) -> Composed:
        """A table of the service's schema, quoted for psycopg statements."""
        return SQL("{}.{}").format(Identifier(self.schema), Identifier(name))
