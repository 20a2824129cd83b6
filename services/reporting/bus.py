"""Reporting on the bus: the consumer of `opportunity.events.v1` (and, for partner
registrations, `lead.events.v1`) into the read models."""

from __future__ import annotations

import asyncpg

from services.reporting.projection import project
from shared.bus.consumer import Batch, BatchConsumer, apply_read_model, records_of
from shared.bus.envelopes import decode_records, header
from shared.contracts.envelope import HEADER_EVENT_TYPE
from shared.contracts.topics import LEAD_EVENTS, OPPORTUNITY_EVENTS
from shared.settings import Settings

LEAD_ONLY = {"LeadCaptured", "LeadMerged", "LeadUnmerged", "LeadForgotten"}


def opportunity_events(pool: asyncpg.Pool, settings: Settings) -> BatchConsumer:
    async def handle(batch: Batch) -> None:  # every partition's records: one transaction
        # Leads themselves are not reported on (and carry contact data): only registrations.
        # Told apart by the relay's header first, so they are not even parsed.
        records = [r for r in records_of(batch) if header(r, HEADER_EVENT_TYPE) not in LEAD_ONLY]
        wanted = [e for _, e in decode_records(records) if e.event_type not in LEAD_ONLY]
        if wanted:
            await apply_read_model(pool, wanted, project)

    topics = [OPPORTUNITY_EVENTS, LEAD_EVENTS]
    return BatchConsumer("opportunity-events", settings, "reporting", topics, handle,
                         batch=settings.reporting_batch)  # fmt: skip
