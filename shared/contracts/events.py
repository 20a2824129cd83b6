"""Payloads (`data`) of the events on `lead.events.v1` and `opportunity.events.v1`.

Each event type maps to one pydantic model and a schema version; producers serialise through
these and consumers validate through them. Old versions are upcast, never edited.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import Field

from shared.contracts.common import Contract, Money, UtcTime
from shared.contracts.partner import Channel, LeadDetails


class LeadCaptured(LeadDetails):
    lead_id: uuid.UUID
    source: str  # "partner" or a web channel
    channel: Channel | None = None
    partner_id: str | None = None
    message_id: str | None = None
    captured_at: UtcTime


class OpportunityOpened(Contract):
    opportunity_id: uuid.UUID
    lead_id: uuid.UUID
    title: str
    stage: str = Field(pattern=r"^[A-F]$")
    probability: int = Field(ge=0, le=100)
    amount: Money | None = None
    source: str
    partner_id: str | None = None
    company: str
    region: str | None = None
    industry: str | None = None
    expected_close: str | None = None
    opened_at: UtcTime


class OpportunityStageChanged(Contract):
    opportunity_id: uuid.UUID
    from_stage: str = Field(pattern=r"^[A-F]$")
    to_stage: str = Field(pattern=r"^[A-F]$")
    probability: int = Field(ge=0, le=100)
    actor: str
    note: str | None = None
    changed_at: UtcTime


EVENT_TYPES: dict[str, tuple[type[Contract], int]] = {
    "LeadCaptured": (LeadCaptured, 1),
    "OpportunityOpened": (OpportunityOpened, 1),
    "OpportunityStageChanged": (OpportunityStageChanged, 1),
}


def parse_event_data(event_type: str, data: dict[str, Any]) -> Contract:
    """Validate an envelope's `data` against its event type's contract."""
    try:
        model, _ = EVENT_TYPES[event_type]
    except KeyError:
        raise ValueError(f"unknown event type {event_type!r}") from None
    return model.model_validate(data)


def schema_version_of(event_type: str) -> int:
    return EVENT_TYPES[event_type][1]
