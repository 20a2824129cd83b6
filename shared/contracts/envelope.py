"""The event envelope of SPEC §2, carried on every topic except replies and dead letters."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any, Self

from pydantic import Field, PrivateAttr

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
    _contract: Contract | None = PrivateAttr(default=None)

    def __eq__(self, other: object) -> bool:
        """Equal fields are equal envelopes, whether or not one's contract was read yet."""
        if not isinstance(other, Envelope):
            return NotImplemented
        return type(self) is type(other) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  # mutable, as pydantic's models are

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy reads its own contract (its `data` may be another)."""
        copy = super().model_copy(update=update, deep=deep)
        copy._contract = None
        return copy

    def contract(self) -> Contract:
        """`data` validated against its event type's contract: once per envelope however many
        times it is asked (the consumer checks it on arrival, the service reads it after)."""
        private = self.__pydantic_private__  # read directly: `self._contract` is a slow lookup
        parsed = private.get("_contract") if private is not None else None
        if parsed is None:
            from shared.contracts.events import parse_event_data  # events builds on envelope

            parsed = parse_event_data(self.event_type, self.data, {FROM_BUS: True})
            self._contract = parsed
        return parsed


# Kafka header names the relay writes beside the envelope.
HEADER_EVENT_TYPE = "event-type"
HEADER_CONTENT_TYPE = "content-type"
HEADER_NOTIFICATION_ID = "x-notification-id"
HEADER_SOURCE = "x-source"
