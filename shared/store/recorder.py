"""The process recorder the event stores use: the library's PostgreSQL process recorder, writing
without psycopg's pipeline mode, sending the stored events in binary by COPY (no text escaping of
each event's bytes, none dumped in Python), and able to write a service's own index rows in the
same transaction as the events (`side_writes`: statements with their rows).

Why: with pipeline mode, psycopg 3.3 hangs for good when one transaction carries a large batch
(reproduced here: ~400 leads of 1 KB in one save never return; the server waits in ClientRead,
the client in Pipeline.sync). The same statements, sent one after another in one transaction,
commit at once. Tracking and the order of notification ids are unchanged; the new ids are not
read back (`insert_events`).

Writers are serialized by an advisory lock of the events table, not by the library's
`LOCK TABLE … IN EXCLUSIVE MODE` (`write_lock_name`): the same order of notification ids, without
the table lock's conflict with VACUUM and ANALYZE.

Round trips are what a small save (one HTTP command) costs, most of them while it holds the
write lock: the lock timeout, the lock and the NOTIFY go in one simple query, and a side write
of one row is a plain execute (executemany enters psycopg's pipeline mode and syncs).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cached_property
from typing import Any

from eventsourcing.persistence import (
    IntegrityError,
    InterfaceError,
    OperationalError,
    StoredEvent,
    Tracking,
)
from eventsourcing.postgres import PostgresProcessRecorder
from eventsourcing.utils import retry
from psycopg.sql import SQL, Composed, Identifier, Literal

# A statement (psycopg placeholders) and the rows to run it with.
SideWrite = tuple[Composed | SQL, Sequence[Sequence[Any]]]


def unnest_rows(types: Iterable[str], numbered: bool = False) -> str:
    """`SELECT * FROM unnest(...)` over one array per column, for a side write of many rows in
    one statement (with `as_columns`): psycopg's executemany sends and the server runs one
    statement per row, and dumps each in Python (a third of a 500-lead batch's cost here).
    `numbered`: asyncpg's placeholders ($1, $2, …), for the read models' writes (`columns`)."""
    arrays = (f"${n}::{t}[]" if numbered else f"%b::{t}[]" for n, t in enumerate(types, 1))
    return "SELECT * FROM unnest(" + ", ".join(arrays) + ")"


def columns(rows: Sequence[Sequence[Any]]) -> tuple[list[Any], ...]:
    """Rows as one list per column: the arrays of an `unnest_rows` statement."""
    return tuple(list(column) for column in zip(*rows, strict=True))


def as_columns(rows: Sequence[Sequence[Any]]) -> list[tuple[list[Any], ...]]:
    """Rows turned into the one parameter row of an `unnest_rows` statement (none: no write)."""
    return [columns(rows)] if rows else []


def write_lock_name(schema: str, events_table: str) -> str:
    """The name of the advisory lock that every transaction inserting into an events table
    takes and holds until it commits: `pg_advisory_xact_lock(hashtextextended(<name>, 0))`
    (the key hashed by the server, so that a script can take the lock as well)."""
    return f"dealstream-events:{schema}.{events_table}"


class BatchProcessRecorder(PostgresProcessRecorder):
    @cached_property
    def _lock_and_notify(self) -> Composed:
        """SET LOCAL lock_timeout, the events table's write lock and NOTIFY: one round trip.

        The lock serializes the transactions that insert events, so that notification ids are
        handed out in commit order and a reader of the log never passes a gap that fills in
        later: the library's reason for `LOCK TABLE … IN EXCLUSIVE MODE`. A transaction-level
        advisory lock does the same among writers, and does not wait for VACUUM or ANALYZE.
        The table lock conflicted with the SHARE UPDATE EXCLUSIVE lock they hold: under load
        every save waited for them until PostgreSQL cancelled them (after `deadlock_timeout`,
        1 s), so each autovacuum of an events table stopped its service for about a second,
        and its vacuum and statistics never got done (an anti-wraparound vacuum, which is not
        cancelled, would have stopped it for the whole vacuum)."""
        return SQL("; ").join([
            SQL("SET LOCAL lock_timeout = '{0}s'").format(self.datastore.lock_timeout),
            SQL("SELECT pg_advisory_xact_lock(hashtextextended({0}, 0))").format(
                Literal(write_lock_name(self.datastore.schema, self.events_table_name))),
            SQL("NOTIFY {0}").format(Identifier(self.channel_name)),
        ])  # fmt: skip

    @cached_property
    def _insert_trackings(self) -> Composed:
        """The library's single-row tracking upsert for several upstreams in one statement: a
        row comes back for each position that moved forward, none for one repeated or lower."""
        return SQL(
            "INSERT INTO {table} (application_name, notification_id) "
            + unnest_rows(("text", "int8"))
            + " ON CONFLICT (application_name) DO UPDATE"
            " SET notification_id = EXCLUDED.notification_id"
            " WHERE {table}.notification_id < EXCLUDED.notification_id"
            " RETURNING application_name"
        ).format(
            table=SQL("{}.{}").format(
                Identifier(self.datastore.schema), Identifier(self.tracking_table_name)
            )
        )

    def _insert_events(
        self, curs: Any, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> None:
        """The upstream positions a save carries, all in one statement: `trackings` (a
        consumer's partitions), and the library's own `tracking` if a library call passes one
        (its separate upsert is not used: one way to record a position). Any that is not ahead
        of what is recorded fails the transaction, as the library's does."""
        tracking: Tracking | None = kwargs.get("tracking")
        trackings: Sequence[Tracking] = kwargs.get("trackings", ())
        if tracking is not None:
            trackings = [*trackings, tracking]
        if not trackings:
            return
        # In the names' order, whatever the caller's: two replicas saving the same upstreams
        # during a rebalance lock their rows in one order, never into a deadlock.
        trackings = sorted(trackings, key=lambda t: t.application_name)
        names = [t.application_name for t in trackings]
        curs.execute(self._insert_trackings, [names, [t.notification_id for t in trackings]])
        if behind := set(names) - {row["application_name"] for row in curs.fetchall()}:
            raise IntegrityError(f"Failed to record tracking for {sorted(behind)}")

    # The whole transaction is inside: a dropped connection or a lock timeout is tried again.
    @retry((InterfaceError, OperationalError), max_attempts=3, wait=0.2)
    def insert_events(self, stored_events: Sequence[StoredEvent], **kwargs: Any) -> None:
        """No notification ids come back (the library's contract allows None): no caller here
        reads them, the relays read the log, and without them the library's `put` makes no
        Recording and Notification per event (7% of capture's batch)."""
        with self.datastore.get_connection() as conn, conn.transaction(), conn.cursor() as curs:
            self._insert_events(curs, stored_events, **kwargs)  # the positions, if any
            if stored_events:
                self._insert_stored_events(curs, stored_events, **kwargs)
            # Also without events: a batch may change only the service's own rows (pipeline's
            # merges that wait for their customer's opportunity), with its position.
            side_writes: Sequence[SideWrite] = kwargs.get("side_writes", ())
            for statement, rows in side_writes:
                if len(rows) == 1:
                    curs.execute(statement, rows[0])
                elif rows:
                    curs.executemany(statement, rows)

    @cached_property
    def _copy_events(self) -> Composed:
        """The events by COPY in binary: psycopg's C code writes each row's fields. As an
        INSERT of four arrays (not one array of the library's composite type, which psycopg
        dumps row by row as escaped text), each element was dumped in Python, and the server
        unpacked the arrays before inserting. Measured here, 1,500 capture events of ~700
        bytes: 1.6-1.8 ms of the client's CPU and 6.2-7.1 ms in all, against 2.3-2.7 and
        8.5-10.8 ms as the INSERT, most of it while the write lock is held. A small save is no
        slower (300 saves of one event, six rounds: median 532-638 µs each, against 563-844)."""
        return SQL(
            "COPY {schema}.{table} (originator_id, originator_version, topic, state)"
            " FROM STDIN (FORMAT BINARY)"
        ).format(
            schema=Identifier(self.datastore.schema),
            table=Identifier(self.events_table_name),
        )

    def _insert_stored_events(
        self, curs: Any, stored_events: Sequence[StoredEvent], **_: Any
    ) -> None:
        curs.execute(self._lock_and_notify, prepare=False)
        with curs.copy(self._copy_events) as copy:
            copy.set_types([self.datastore.originator_id_type, "int8", "text", "bytea"])
            for e in stored_events:
                copy.write_row((e.originator_id, e.originator_version, e.topic, e.state))
