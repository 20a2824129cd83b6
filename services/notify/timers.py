"""Notify's durable state: its picture of each opportunity and the timers that picture implies,
projected from opportunity events through the idempotent read-model consumer (so a redelivery
or a replay from the start changes nothing), and the notifications and deliveries it issued."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from dataclasses import fields

import asyncpg

from services.notify.domain import Picture, fold, timers
from shared.bus.consumer import Projector
from shared.contracts.envelope import Envelope
from shared.settings import Rules
from shared.store.migrations import BUS_TABLES, READ_MODEL_TABLES, Migration
from shared.store.recorder import unnest_rows

SCHEMA = "notify"
MIGRATIONS: list[Migration] = [
    BUS_TABLES,
    READ_MODEL_TABLES,
    (
        3,
        """
        CREATE TABLE follow_up_timer (
            opportunity_id uuid PRIMARY KEY,
            stage char(1) NOT NULL,
            due_at timestamptz NOT NULL,
            started_by uuid NOT NULL,
            started_at timestamptz NOT NULL
        );
        CREATE INDEX follow_up_timer_due ON follow_up_timer (due_at);
        """,
    ),
    (
        4,
        """
        DROP TABLE follow_up_timer;
        CREATE TABLE opportunity_picture (
            opportunity_id uuid PRIMARY KEY,
            title text NOT NULL,
            company text NOT NULL,
            stage char(1) NOT NULL,
            status text NOT NULL,
            owner text,
            team text,
            tier text NOT NULL,
            expected_close date,
            clock_started_at timestamptz NOT NULL,
            clock_event uuid NOT NULL,
            next_follow_up_at timestamptz,
            last_activity_at timestamptz NOT NULL,
            last_activity_event uuid NOT NULL,
            opened_event uuid NOT NULL
        );
        CREATE INDEX opportunity_picture_team ON opportunity_picture (team, status);
        CREATE INDEX opportunity_picture_owner ON opportunity_picture (owner);
        -- A timer fires once per clock: a new clock (another event behind it, another due time)
        -- arms it again.
        CREATE TABLE timer (
            opportunity_id uuid NOT NULL,
            kind text NOT NULL,
            due_at timestamptz NOT NULL,
            derived_from uuid NOT NULL,
            fired_at timestamptz,
            PRIMARY KEY (opportunity_id, kind)
        );
        CREATE INDEX timer_due ON timer (due_at) WHERE fired_at IS NULL;
        -- One row per notification; `key` names what it is about (kind, opportunity, the event
        -- behind it, recipient), so the same reminder can never be issued twice.
        CREATE TABLE notification (
            notification_id uuid PRIMARY KEY,
            key text NOT NULL UNIQUE,
            kind text NOT NULL,
            opportunity_id uuid,
            team text,
            recipient text,
            issued_at timestamptz NOT NULL,
            payload jsonb NOT NULL
        );
        CREATE INDEX notification_opportunity ON notification (opportunity_id);
        CREATE INDEX notification_recipient ON notification (recipient);
        CREATE TABLE delivery (
            id bigserial PRIMARY KEY,
            notification_id uuid NOT NULL REFERENCES notification,
            channel text NOT NULL,
            address text,
            status text NOT NULL DEFAULT 'pending',
            attempts int NOT NULL DEFAULT 0,
            claimed_by text,
            claimed_until timestamptz,
            last_error text,
            sent_at timestamptz,
            UNIQUE (notification_id, channel)
        );
        CREATE INDEX delivery_pending ON delivery (id) WHERE status = 'pending';
        CREATE TABLE delivery_attempt (
            delivery_id bigint NOT NULL REFERENCES delivery,
            attempt int NOT NULL,
            attempted_at timestamptz NOT NULL,
            ok boolean NOT NULL,
            error text,
            PRIMARY KEY (delivery_id, attempt)
        );
        """,
    ),
]

PICTURE_COLUMNS = [f.name for f in fields(Picture)]
# Each column's type, for a batch's changed pictures as one statement of arrays (executemany
# ran one statement per picture on the server).
PICTURE_TYPES = {
    "opportunity_id": "uuid", "title": "text", "company": "text", "stage": "text",
    "status": "text", "owner": "text", "team": "text", "tier": "text", "expected_close": "date",
    "clock_started_at": "timestamptz", "clock_event": "uuid", "next_follow_up_at": "timestamptz",
    "last_activity_at": "timestamptz", "last_activity_event": "uuid", "opened_event": "uuid",
}  # fmt: skip
assert list(PICTURE_TYPES) == PICTURE_COLUMNS, "a type for every column of the picture, in order"
_UPSERT_PICTURE = (
    f"INSERT INTO opportunity_picture ({', '.join(PICTURE_COLUMNS)}) "
    + unnest_rows(PICTURE_TYPES.values(), numbered=True)
    + " ON CONFLICT (opportunity_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in PICTURE_COLUMNS[1:])
)


def picture_of(row: asyncpg.Record) -> Picture:
    return Picture(**{c: row[c] for c in PICTURE_COLUMNS})


def timer_projector(rules: Rules) -> Projector:
    """Fold a batch of events into the pictures of their opportunities, then set each changed
    opportunity's timers to exactly what its picture implies."""

    async def project(conn: asyncpg.Connection, envelopes: Sequence[Envelope]) -> None:
        ids = list({e.stream_id for e in envelopes})
        rows = await conn.fetch(
            "SELECT * FROM opportunity_picture WHERE opportunity_id = ANY($1::uuid[])", ids
        )
        pictures: dict[uuid.UUID, Picture] = {r["opportunity_id"]: picture_of(r) for r in rows}
        before = dict(pictures)
        for envelope in envelopes:
            folded = fold(
                pictures.get(envelope.stream_id),
                envelope.event_type,
                envelope.event_id,
                envelope.data,
            )
            if folded is not None:
                pictures[envelope.stream_id] = folded
        changed = [p for key, p in pictures.items() if before.get(key) != p]
        if not changed:
            return
        # Columns of shallow values (dataclasses.astuple deep-copies every field); each
        # opportunity once, as ON CONFLICT DO UPDATE needs.
        columns = [[getattr(p, c) for p in changed] for c in PICTURE_COLUMNS]
        await conn.execute(_UPSERT_PICTURE, *columns)
        await set_timers(conn, changed, rules, had_picture=before.keys())

    return project


async def set_timers(
    conn: asyncpg.Connection,
    pictures: Sequence[Picture],
    rules: Rules,
    had_picture: Collection[uuid.UUID],
) -> None:
    """Each opportunity's timers made exactly what its picture implies. Timers are written only
    here, with their picture, and no picture is ever removed: an opportunity that had no picture
    before this batch (`had_picture`) has no timers to drop."""
    opportunity, kind, due, derived = [], [], [], []
    for picture in pictures:
        for timer_kind, (due_at, event) in timers(picture, rules).items():
            opportunity.append(picture.opportunity_id)
            kind.append(timer_kind)
            due.append(due_at)
            derived.append(event)
    known = [p.opportunity_id for p in pictures if p.opportunity_id in had_picture]
    if known:
        # (Under a flood of new leads every batch's opportunities were new, and this statement,
        # run anyway, was a fifth of the database's time: 12.5 ms a batch, finding nothing, on a
        # timer table not yet analyzed, so read whole.)
        await conn.execute(
            "DELETE FROM timer t WHERE t.opportunity_id = ANY($1::uuid[]) AND NOT EXISTS"
            " (SELECT 1 FROM unnest($2::uuid[], $3::text[]) AS n(o, k)"
            "  WHERE n.o = t.opportunity_id AND n.k = t.kind)",
            known,
            opportunity,
            kind,
        )
    if opportunity:
        # Unchanged timers keep their fired mark; a moved or re-derived one is armed again.
        await conn.execute(
            "INSERT INTO timer (opportunity_id, kind, due_at, derived_from)"
            " SELECT * FROM unnest($1::uuid[], $2::text[], $3::timestamptz[], $4::uuid[])"
            " ON CONFLICT (opportunity_id, kind) DO UPDATE SET due_at = EXCLUDED.due_at,"
            " derived_from = EXCLUDED.derived_from, fired_at = NULL"
            " WHERE timer.due_at <> EXCLUDED.due_at OR timer.derived_from <> EXCLUDED.derived_from",
            opportunity,
            kind,
            due,
            derived,
        )
