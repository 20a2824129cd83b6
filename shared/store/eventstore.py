"""The event-store application base: an `eventsourcing` Application on PostgreSQL whose recorder
is a process recorder, so a save can carry the upstream position (Tracking) in the same
transaction as the new events. The library's protected `_record` is called here and only here."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from eventsourcing.application import Application, ProcessingEvent
from eventsourcing.domain import Aggregate, DomainEventProtocol
from eventsourcing.persistence import Notification, ProcessRecorder, Recording, Tracking
from psycopg.sql import SQL, Identifier

from shared.store.db import eventsourcing_env


class EventStoreApp(Application[uuid.UUID]):
    """Base of the capture and pipeline stores. `name` sets the table prefix."""

    def __init__(self, dsn: str, schema: str, pool_size: int = 5) -> None:
        self.schema = schema
        super().__init__(env=eventsourcing_env(dsn, schema, pool_size))

    def construct_recorder(self) -> ProcessRecorder:
        return self.factory.process_recorder()

    @property
    def process_recorder(self) -> ProcessRecorder:
        recorder = self.recorder
        assert isinstance(recorder, ProcessRecorder)
        return recorder

    def record(
        self, aggregates: Iterable[Aggregate], tracking: Tracking | None = None
    ) -> list[Recording[uuid.UUID]]:
        """Store the pending events of all given aggregates, and the tracking position if any,
        in one transaction. A repeated or lower tracking id raises IntegrityError."""
        processing = ProcessingEvent[uuid.UUID](tracking)
        processing.collect_events(*aggregates)
        if not processing.events and tracking is None:
            return []
        return self._record(processing)

    def tracked_position(self, name: str) -> int:
        return self.process_recorder.max_tracking_id(name) or 0

    def notifications_after(self, position: int, limit: int) -> Sequence[Notification]:
        return self.process_recorder.select_notifications(
            start=position, limit=limit, inclusive_of_start=False
        )

    def to_event(self, notification: Notification) -> DomainEventProtocol[uuid.UUID]:
        return self.mapper.to_domain_event(notification)

    def existing_ids(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """Which of these aggregates already have events: one query for a whole batch."""
        if not ids:
            return set()
        datastore: Any = getattr(self.recorder, "datastore")  # noqa: B009
        statement = SQL(
            "SELECT DISTINCT originator_id FROM {schema}.{table} WHERE originator_id = ANY(%s)"
        ).format(schema=Identifier(self.schema), table=Identifier(f"{self.name.lower()}_events"))
        with datastore.transaction(commit=False) as cursor:
            cursor.execute(statement, [list(ids)])
            return {row["originator_id"] for row in cursor.fetchall()}
