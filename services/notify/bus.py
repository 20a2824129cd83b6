"""Notify on the bus: the consumer of `opportunity.events.v1` into durable timers."""

from __future__ import annotations

import asyncpg
from aiokafka.structs import TopicPartition

from services.notify.timers import timer_projector
from shared.bus.consumer import Batch, BatchConsumer, Record, apply_read_model
from shared.bus.envelopes import decode_records
from shared.contracts.topics import OPPORTUNITY_EVENTS
from shared.settings import Settings


def opportunity_events(pool: asyncpg.Pool, settings: Settings) -> BatchConsumer:
    async def apply(records: list[Record]) -> None:
        project = timer_projector(settings.rules())  # per batch: dealstream.toml edits apply
        await apply_read_model(pool, [e for _, e in decode_records(records)], project)

    async def handle(_: TopicPartition, records: list[Record]) -> None:
        await apply(records)

    async def handle_fetch(batch: Batch) -> None:  # every partition's records: one transaction
        await apply([record for records in batch.values() for record in records])

    return BatchConsumer("opportunity-events", settings, "notify", [OPPORTUNITY_EVENTS], handle,
                         handle_fetch=handle_fetch)  # fmt: skip
