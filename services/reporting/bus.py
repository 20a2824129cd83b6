"""Reporting on the bus: the consumer of `opportunity.events.v1` (and, for partner
registrations, `lead.events.v1`) into the read models."""

from __future__ import annotations

import asyncpg
from aiokafka.structs import TopicPartition

from services.reporting.projection import project
from shared.bus.consumer import Batch, BatchConsumer, Record, apply_read_model
from shared.bus.envelopes import decode_records, header
from shared.contracts.envelope import HEADER_EVENT_TYPE
from shared.contracts.topics import LEAD_EVENTS, OPPORTUNITY_EVENTS
from shared.settings import Settings

LEAD_ONLY = {"LeadCaptured", "LeadMerged", "LeadForgotten"}


def opportunity_events(pool: asyncpg.Pool, settings: Settings) -> BatchConsumer:
    async def apply(records: list[Record]) -> None:
        # Leads themselves are not reported on (and carry contact data): only registrations.
        # Told apart by the relay's header first, so they are not even parsed.
        records = [r for r in records if header(r, HEADER_EVENT_TYPE) not in LEAD_ONLY]
        wanted = [e for _, e in decode_records(records) if e.event_type not in LEAD_ONLY]
        if wanted:
            await apply_read_model(pool, wanted, project)

    async def handle(_: TopicPartition, records: list[Record]) -> None:
        await apply(records)

    async def handle_fetch(batch: Batch) -> None:  # every partition's records: one transaction
        await apply([record for records in batch.values() for record in records])

    topics = [OPPORTUNITY_EVENTS, LEAD_EVENTS]
    return BatchConsumer("opportunity-events", settings, "reporting", topics, handle,
                         batch=settings.reporting_batch, handle_fetch=handle_fetch)  # fmt: skip
