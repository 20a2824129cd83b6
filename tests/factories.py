"""Envelopes as the relays publish them, for tests and benchmarks."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from shared.contracts.envelope import Envelope, event_id_for

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def lead_captured(lead_id: uuid.UUID) -> Envelope:
    return Envelope(
        event_id=event_id_for(lead_id, 1),
        event_type="LeadCaptured",
        schema_version=1,
        stream_id=lead_id,
        stream_version=1,
        occurred_at=NOW,
        correlation_id="m-1",
        causation_id="partner.leads.v1/0/1",
        data={
            "lead_id": str(lead_id),
            "source": "partner",
            "partner_id": "acme",
            "message_id": f"acme-{lead_id.hex[:6]}",
            "captured_at": "2026-11-22T10:00:00Z",
            "company": {"name": "Northwind", "region": "CN-SN"},
            "contact": {"name": "Li Wei"},
            "budget": {"amount": "350000.00", "currency": "CNY"},
        },
    )


def opportunity_event(
    stream: uuid.UUID, version: int, event_type: str, data: dict[str, Any]
) -> Envelope:
    return Envelope(
        event_id=event_id_for(stream, version),
        event_type=event_type,
        schema_version=1,
        stream_id=stream,
        stream_version=version,
        occurred_at=NOW + timedelta(minutes=version),
        correlation_id="c",
        causation_id="x",
        data=data,
    )


def opened(stream: uuid.UUID, amount: str) -> Envelope:
    return opportunity_event(
        stream,
        1,
        "OpportunityOpened",
        {
            "opportunity_id": str(stream),
            "lead_id": str(uuid.uuid4()),
            "title": "t",
            "stage": "A",
            "probability": 10,
            "amount": {"amount": amount, "currency": "CNY"},
            "source": "partner",
            "partner_id": "acme",
            "company": "Northwind",
            "region": "CN-SN",
            "opened_at": "2026-11-22T10:00:00Z",
        },
    )


def moved(
    stream: uuid.UUID, version: int, from_stage: str, to_stage: str, probability: int
) -> Envelope:
    return opportunity_event(
        stream,
        version,
        "OpportunityStageChanged",
        {
            "opportunity_id": str(stream),
            "from_stage": from_stage,
            "to_stage": to_stage,
            "probability": probability,
            "actor": "rep1",
            "changed_at": "2026-11-22T11:00:00Z",
        },
    )


def duplicate_lead(
    lead_id: uuid.UUID, into: uuid.UUID, rule: str, merged_at: str
) -> tuple[Envelope, Envelope]:
    """A lead capture found to be a known customer's, as capture publishes it: captured (naming
    the customer's first lead) and merged into it."""
    captured = lead_captured(lead_id)
    captured = captured.model_copy(update={"data": {**captured.data, "duplicate_of": str(into)}})
    merged = opportunity_event(lead_id, 2, "LeadMerged", {
        "lead_id": str(lead_id), "into_lead_id": str(into), "rule": rule, "merged_at": merged_at,
    })  # fmt: skip
    return captured, merged
