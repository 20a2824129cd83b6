"""Between stored domain events and bus messages: the v1 envelope in, the v1 envelope out."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiokafka.structs import ConsumerRecord
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Notification
from eventsourcing.utils import resolve_topic
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
    event_id_text,
)
from shared.contracts.events import EVENT_TYPES, schema_version_of
from shared.store.transcoder import read_plain


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
    return _message(topic, source, public.public_name, event.originator_id,
                    event.originator_version, utc_iso(public.timestamp), public.correlation_id,
                    public.causation_id, public.payload)  # fmt: skip


def _message(topic: str, source: str, name: str, stream_id: uuid.UUID | str, version: int,
             occurred_at: str, correlation_id: str, causation_id: str,
             data: dict[str, Any]) -> Outbound:  # fmt: skip
    """A v1 envelope as its bus message, written once for both ways a relay gets there."""
    stream = str(stream_id)
    value = {
        "event_id": event_id_text(stream, version),
        "event_type": name,
        "schema_version": schema_version_of(name),
        "stream_id": stream,
        "stream_version": version,
        "occurred_at": occurred_at,
        "correlation_id": correlation_id,
        "causation_id": causation_id,
        "data": data,
    }
    return Outbound(
        topic=topic,
        key=stream.encode(),
        value=orjson.dumps(value),  # compact UTF-8, as json.dumps(ensure_ascii=False) writes
        headers=(
            (HEADER_EVENT_TYPE, name.encode()),
            (HEADER_CONTENT_TYPE, b"application/json"),
            (HEADER_SOURCE, source.encode()),
        ),
    )


@dataclass(frozen=True)
class PublishedRoute:
    """The route of a store whose published events (`classes`) all go to one `topic` as v1
    envelopes. The relay calls `stored` first: the envelope is written straight from the stored
    JSON (the payload was dumped as JSON when the event was made, the time is the library's
    ISO string), without reviving the domain event only to write it out again, which was most
    of a relay's time. A state that is not plain JSON of that shape (`None`) goes the general
    way, through the domain event and `envelope_message`; a unit test holds the two equal.
    Only for stores whose `to_events` is the mapper's (capture's is not: it opens contacts)."""

    topic: str
    source: str
    classes: tuple[type, ...]

    def __call__(
        self, event: DomainEventProtocol[uuid.UUID], _: Notification
    ) -> Sequence[Outbound]:
        if isinstance(event, self.classes):
            return [envelope_message(self.topic, event, self.source)]
        return []

    def stored(self, notification: Notification) -> Sequence[Outbound] | None:
        event_class = resolve_topic(notification.topic)  # cached by the library
        if not (isinstance(event_class, type) and issubclass(event_class, self.classes)):
            return []
        try:
            if (state := stored_state(notification)) is None:
                return None
            at = state["timestamp"]
            occurred = at["_data_"]
            if at["_type_"] != "datetime_iso" or not occurred.endswith("+00:00"):
                return None
            name: str = event_class.public_name  # type: ignore[attr-defined]
            return [
                _message(
                    self.topic,
                    self.source,
                    name,
                    notification.originator_id,
                    notification.originator_version,
                    occurred[:-6] + "Z",  # utc_iso of that time
                    state["correlation_id"],
                    state["causation_id"],
                    state["payload"],
                )
            ]
        except (KeyError, TypeError):
            return None


def stored_state(notification: Notification) -> dict[str, Any] | None:
    """A stored event's state as plain JSON, for a route writing from it; None when only the
    store's transcoder reads it as written: an integer beyond 64 bits, JSON that orjson refuses,
    or an object it revives from `{"_type_": ..., "_data_": ...}` besides the event's time (a
    count of the bytes, so a text that merely reads `_type_` goes the general way too)."""
    if notification.state.count(b'"_type_"') > 1:
        return None
    state = read_plain(notification.state)
    return state if isinstance(state, dict) else None


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
