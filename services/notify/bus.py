"""Notify on the bus: the consumer of `opportunity.events.v1` into durable timers."""

from __future__ import annotations

import asyncpg

from services.notify.timers import timer_projector
from shared.bus.consumer import Batch, BatchConsumer, apply_read_model, records_of
from shared.bus.envelopes import decode_records
from shared.contracts.topics import OPPORTUNITY_EVENTS
from shared.settings import Settings


def opportunity_events(pool: asyncpg.Pool, settings: Settings) -> BatchConsumer:
    async def handle(batch: Batch) -> None:  # every partition's records: one transaction
        project = timer_projector(settings.rules())  # per batch: dealstream.toml edits apply
        await apply_read_model(pool, [e for _, e in decode_records(records_of(batch))], project)

    return BatchConsumer("opportunity-events", settings, "notify", [OPPORTUNITY_EVENTS], handle)
