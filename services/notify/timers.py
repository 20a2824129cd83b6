"""Notify's durable timers: projected from opportunity events through the idempotent read-model
consumer; each timer names the event that started its clock."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg

from services.notify.domain import follow_up_due
from shared.bus.consumer import Projector
from shared.contracts.envelope import Envelope
from shared.contracts.events import OpportunityOpened, OpportunityStageChanged
from shared.settings import Rules
from shared.store.migrations import BUS_TABLES, READ_MODEL_TABLES, Migration

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
]


def _timer(envelope: Envelope, rules: Rules) -> tuple[Any, ...] | None:
    if envelope.event_type == "OpportunityOpened":
        opened = OpportunityOpened.model_validate(envelope.data)
        stage, started, opportunity = opened.stage, opened.opened_at, opened.opportunity_id
    elif envelope.event_type == "OpportunityStageChanged":
        changed = OpportunityStageChanged.model_validate(envelope.data)
        stage, started, opportunity = changed.to_stage, changed.changed_at, changed.opportunity_id
    else:
        return None
    due = follow_up_due(stage, started, rules)
    return (opportunity, stage, due, envelope.event_id, started)


def timer_projector(rules: Rules) -> Projector:
    """Each stage event fully sets its opportunity's timer, so only the last one per opportunity
    in a batch matters: one upsert and one delete per batch."""

    async def project(conn: asyncpg.Connection, envelopes: Sequence[Envelope]) -> None:
        latest: dict[uuid.UUID, tuple[Any, ...]] = {}
        for envelope in envelopes:
            row = _timer(envelope, rules)
            if row is not None:
                latest[row[0]] = row
        upserts = [row for row in latest.values() if row[2] is not None]
        ended = [row[0] for row in latest.values() if row[2] is None]
        if upserts:
            await conn.executemany(
                "INSERT INTO follow_up_timer"
                " (opportunity_id, stage, due_at, started_by, started_at)"
                " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (opportunity_id) DO UPDATE SET"
                " stage = EXCLUDED.stage, due_at = EXCLUDED.due_at,"
                " started_by = EXCLUDED.started_by, started_at = EXCLUDED.started_at",
                upserts,
            )
        if ended:
            await conn.execute(
                "DELETE FROM follow_up_timer WHERE opportunity_id = ANY($1::uuid[])", ended
            )

    return project
