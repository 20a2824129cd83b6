"""Between stored domain events and bus messages: the v1 envelope in, the v1 envelope out."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

import orjson
from aiokafka.structs import ConsumerRecord
from eventsourcing.domain import DomainEventProtocol
from pydantic import ValidationError

from shared.bus.relay import Outbound
from shared.clock import utc_iso
from shared.contracts.envelope import (
    HEADER_CONTENT_TYPE,
    HEADER_EVENT_TYPE,
    HEADER_NOTIFICATION_ID,
    HEADER_SOURCE,
    Envelope,
    event_id_for,
)
from shared.contracts.events import EVENT_TYPES, schema_version_of


def envelope_of(event: DomainEventProtocol[uuid.UUID]) -> Envelope:
    public: Any = event
    return Envelope(
        event_id=event_id_for(event.originator_id, event.originator_version),
        event_type=public.public_name,
        schema_version=schema_version_of(public.public_name),
        stream_id=event.originator_id,
        stream_version=event.originator_version,
        occurred_at=public.timestamp,
        correlation_id=public.correlation_id,
        causation_id=public.causation_id,
        data=public.payload,
    )


def envelope_message(topic: str, event: DomainEventProtocol[uuid.UUID], source: str) -> Outbound:
    """The bus message of a stored event. Hot path of every relay: the payload was validated
    against its contract when the event was made, so the envelope is written directly here,
    field for field as `Envelope` (a unit test holds the two equal)."""
    public: Any = event
    stream = str(event.originator_id)
    value = {
        "event_id": str(event_id_for(event.originator_id, event.originator_version)),
        "event_type": public.public_name,
        "schema_version": schema_version_of(public.public_name),
        "stream_id": stream,
        "stream_version": event.originator_version,
        "occurred_at": utc_iso(public.timestamp),
        "correlation_id": public.correlation_id,
        "causation_id": public.causation_id,
        "data": public.payload,
    }
    return Outbound(
        topic=topic,
        key=stream.encode(),
        value=orjson.dumps(value),  # compact UTF-8, as json.dumps(ensure_ascii=False) writes
        headers=(
            (HEADER_EVENT_TYPE, public.public_name.encode()),
            (HEADER_CONTENT_TYPE, b"application/json"),
            (HEADER_SOURCE, source.encode()),
        ),
    )


class BadEnvelope(ValueError):
    pass


def header(record: ConsumerRecord[Any, Any], name: str) -> str | None:
    for key, value in record.headers or ():
        if key == name:
            return bytes(value or b"").decode("utf-8", "replace")
    return None


def notification_id_of(record: ConsumerRecord[Any, Any]) -> int:
    raw = header(record, HEADER_NOTIFICATION_ID)
    if raw is None or not raw.isdigit():
        raise BadEnvelope(f"no {HEADER_NOTIFICATION_ID} header")
    return int(raw)


def decode_envelope(record: ConsumerRecord[Any, Any]) -> Envelope:
    """Parse and validate an envelope and its payload; BadEnvelope says why not."""
    try:
        envelope = Envelope.model_validate_json(record.value or b"")
        if envelope.event_type in EVENT_TYPES:  # newer types pass through unvalidated
            envelope.contract()
    except (ValueError, ValidationError, TypeError, RecursionError) as exc:
        raise BadEnvelope(str(exc)[:500]) from exc
    return envelope


log = logging.getLogger(__name__)


def decode_records(records: Sequence[ConsumerRecord[Any, Any]]) -> list[tuple[int, Envelope]]:
    """Envelopes with the upstream notification id the relay put in their headers. A malformed
    message is logged and skipped: it cannot be applied, and it must not stop the partition."""
    decoded = []
    for record in records:
        try:
            decoded.append((notification_id_of(record), decode_envelope(record)))
        except BadEnvelope as exc:
            log.error(
                "skipping malformed event at %s/%s/%s: %s",
                record.topic,
                record.partition,
                record.offset,
                exc,
            )
    return decoded
