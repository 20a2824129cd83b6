"""Projection of opportunity events into reporting's tables (written through the idempotent
read-model consumer, one transaction per batch)."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import asyncpg

from shared.contracts.envelope import Envelope
from shared.contracts.events import OpportunityOpened, OpportunityStageChanged
from shared.store.migrations import BUS_TABLES, READ_MODEL_TABLES, Migration

SCHEMA = "reporting"
MIGRATIONS: list[Migration] = [
    BUS_TABLES,
    READ_MODEL_TABLES,
    (
        3,
        """
        CREATE TABLE opportunity (
            opportunity_id uuid PRIMARY KEY,
            lead_id uuid NOT NULL,
            stage char(1) NOT NULL,
            status text NOT NULL DEFAULT 'open',
            probability integer NOT NULL,
            amount numeric(18, 2),
            currency char(3),
            source text NOT NULL,
            partner_id text,
            region text,
            industry text,
            opened_at timestamptz NOT NULL,
            updated_at timestamptz NOT NULL
        );
        CREATE INDEX opportunity_stage ON opportunity (status, stage);
        """,
    ),
]


def _opened_row(envelope: Envelope) -> tuple[Any, ...]:
    opened = OpportunityOpened.model_validate(envelope.data)
    amount: Decimal | None = opened.amount.amount if opened.amount else None
    return (
        opened.opportunity_id,
        opened.lead_id,
        opened.stage,
        opened.probability,
        amount,
        opened.amount.currency if opened.amount else None,
        opened.source,
        opened.partner_id,
        opened.region,
        opened.industry,
        opened.opened_at,
        envelope.occurred_at,
    )


def _stage_row(envelope: Envelope) -> tuple[Any, ...]:
    changed = OpportunityStageChanged.model_validate(envelope.data)
    status = "won" if changed.to_stage == "F" else "open"
    return (
        changed.opportunity_id,
        changed.to_stage,
        changed.probability,
        status,
        envelope.occurred_at,
    )


async def project(conn: asyncpg.Connection, envelopes: Sequence[Envelope]) -> None:
    """One `executemany` per kind per batch: every opening first (version 1 precedes all else in
    its stream), then each opportunity's last stage change (each one sets the whole stage)."""
    opened = [_opened_row(e) for e in envelopes if e.event_type == "OpportunityOpened"]
    if opened:
        await conn.executemany(
            "INSERT INTO opportunity (opportunity_id, lead_id, stage, probability, amount,"
            " currency, source, partner_id, region, industry, opened_at, updated_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            opened,
        )
    staged = {
        row[0]: row
        for row in (_stage_row(e) for e in envelopes if e.event_type == "OpportunityStageChanged")
    }
    if staged:
        await conn.executemany(
            "UPDATE opportunity SET stage = $2, probability = $3, status = $4, updated_at = $5"
            " WHERE opportunity_id = $1",
            list(staged.values()),
        )
