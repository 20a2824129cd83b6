"""Pipeline on the bus: the consumer of `lead.events.v1` and what its stored events become."""

from __future__ import annotations

import asyncio

from aiokafka.structs import TopicPartition

from services.pipeline.app import PipelineApp
from services.pipeline.domain import Opportunity
from shared.bus.consumer import BatchConsumer, Record
from shared.bus.envelopes import PublishedRoute, decode_records
from shared.contracts.topics import LEAD_EVENTS, OPPORTUNITY_EVENTS
from shared.settings import Settings

# Every opportunity event, as its v1 envelope on `opportunity.events.v1`.
route = PublishedRoute(OPPORTUNITY_EVENTS, "pipeline", (Opportunity.Opened, Opportunity.Changed))


def lead_events(app: PipelineApp, settings: Settings) -> BatchConsumer:
    async def handle(partition: TopicPartition, records: list[Record]) -> None:
        name = f"capture:p{partition.partition}"
        # Rules are read per batch (cached by the file's mtime): an edited dealstream.toml —
        # a new team, a routing rule — applies without a restart.
        rules = settings.rules()
        # Decoded in the worker thread too: the event loop goes back to fetching, and another
        # partition's batch starts while this one is parsed.
        await asyncio.to_thread(lambda: app.apply_lead_events(name, decode_records(records), rules))

    return BatchConsumer("lead-events", settings, "pipeline", [LEAD_EVENTS], handle)
