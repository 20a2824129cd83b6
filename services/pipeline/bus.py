"""Pipeline on the bus: the consumer of `lead.events.v1` and what its stored events become."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

from aiokafka.structs import TopicPartition
from eventsourcing.domain import DomainEventProtocol
from eventsourcing.persistence import Notification

from services.pipeline.app import PipelineApp
from services.pipeline.domain import Opportunity
from shared.bus.consumer import BatchConsumer, Record
from shared.bus.envelopes import decode_records, envelope_message
from shared.bus.relay import Outbound
from shared.contracts.topics import LEAD_EVENTS, OPPORTUNITY_EVENTS
from shared.settings import Settings


def route(event: DomainEventProtocol[uuid.UUID], _: Notification) -> Sequence[Outbound]:
    if isinstance(event, Opportunity.Opened | Opportunity.Changed):
        return [envelope_message(OPPORTUNITY_EVENTS, event, "pipeline")]
    return []


def lead_events(app: PipelineApp, settings: Settings) -> BatchConsumer:
    async def handle(partition: TopicPartition, records: list[Record]) -> None:
        items = decode_records(records)
        name = f"capture:p{partition.partition}"
        # Rules are read per batch (cached by the file's mtime): an edited dealstream.toml —
        # a new team, a routing rule — applies without a restart.
        await asyncio.to_thread(app.apply_lead_events, name, items, settings.rules())

    return BatchConsumer("lead-events", settings, "pipeline", [LEAD_EVENTS], handle)
