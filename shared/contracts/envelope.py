"""The event envelope of SPEC §2, carried on every topic except replies and dead letters."""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import Field

from shared.contracts.common import FROM_BUS, Contract, UtcTime

EVENT_ID_NAMESPACE = uuid.UUID("5b0f7a52-8e0a-4c8e-9d55-2f1d2f6f0c11")


def event_id_for(stream_id: uuid.UUID, stream_version: int) -> uuid.UUID:
    """Stable across redelivery and republishing: derived from the event's place in its stream."""
    return uuid.uuid5(EVENT_ID_NAMESPACE, f"{stream_id}:{stream_version}")


class Envelope(Contract):
    event_id: uuid.UUID
    event_type: str = Field(min_length=1)
    schema_version: int = Field(ge=1)
    stream_id: uuid.UUID
    stream_version: int = Field(ge=1)
    occurred_at: UtcTime
    correlation_id: str
    causation_id: str
    data: dict[str, Any]

    def contract(self) -> Contract:
        """`data` validated against its event type's contract, as read off the bus: written by
        one of our services, which checked it in full at the edge (see FROM_BUS)."""
        from shared.contracts.events import parse_event_data  # events builds on envelope

        return parse_event_data(self.event_type, self.data, {FROM_BUS: True})


# Kafka header names the relay writes beside the envelope.
HEADER_EVENT_TYPE = "event-type"
HEADER_CONTENT_TYPE = "content-type"
HEADER_NOTIFICATION_ID = "x-notification-id"
HEADER_SOURCE = "x-source"
