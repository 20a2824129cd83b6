"""Pipeline on the bus: the consumer of `lead.events.v1` and what its stored events become."""

from __future__ import annotations

import asyncio

from services.pipeline.app import PipelineApp
from services.pipeline.domain import Opportunity
from shared.bus.consumer import Batch, BatchConsumer
from shared.bus.envelopes import PublishedRoute, decode_records
from shared.contracts.topics import LEAD_EVENTS, OPPORTUNITY_EVENTS
from shared.settings import Settings

# Every opportunity event, as its v1 envelope on `opportunity.events.v1`.
route = PublishedRoute(OPPORTUNITY_EVENTS, "pipeline", (Opportunity.Opened, Opportunity.Changed))


def lead_events(app: PipelineApp, settings: Settings) -> BatchConsumer:
    async def handle(batch: Batch) -> None:
        # Rules are read per batch (cached by the file's mtime): an edited dealstream.toml —
        # a new team, a routing rule — applies without a restart.
        rules = settings.rules()

        def apply() -> int:
            # Decoded in the worker thread too: the event loop goes back to fetching.
            items = []
            for partition, records in batch.items():
                name = f"capture:p{partition.partition}"  # the upstream: once per partition
                items += [(name, i, envelope) for i, envelope in decode_records(records)]
            return app.apply_tracked_lead_events(items, rules)

        await asyncio.to_thread(apply)

    return BatchConsumer("lead-events", settings, "pipeline", [LEAD_EVENTS], handle)
