"""Pipeline's use cases over its event store: opening opportunities from captured leads, exactly
once per upstream event."""

from __future__ import annotations

from collections.abc import Sequence

from eventsourcing.domain import Aggregate

from services.pipeline.domain import Opportunity, opportunity_id_for
from shared.bus.consumer import record_tracked
from shared.contracts.envelope import Envelope
from shared.contracts.events import LeadCaptured
from shared.settings import Rules
from shared.store.eventstore import EventStoreApp
from shared.store.migrations import BUS_TABLES, Migration

SCHEMA = "pipeline"
MIGRATIONS: list[Migration] = [BUS_TABLES]


class PipelineApp(EventStoreApp):
    name = "Pipeline"

    def apply_lead_events(
        self, tracking_name: str, items: Sequence[tuple[int, Envelope]], rules: Rules
    ) -> int:
        """Open an opportunity for each captured lead not seen before (tracked upstream ids)."""

        def decide(envelopes: list[Envelope]) -> list[Aggregate]:
            leads = [
                LeadCaptured.model_validate(e.data)
                for e in envelopes
                if e.event_type == "LeadCaptured"
            ]
            ids = [opportunity_id_for(lead.lead_id) for lead in leads]
            known = self.existing_ids(ids)
            opened: list[Aggregate] = []
            for envelope, lead in zip(
                (e for e in envelopes if e.event_type == "LeadCaptured"), leads, strict=True
            ):
                if opportunity_id_for(lead.lead_id) in known:
                    continue
                known.add(opportunity_id_for(lead.lead_id))
                opened.append(
                    Opportunity.open_from_lead(
                        lead, rules, str(envelope.event_id), envelope.correlation_id
                    )
                )
            return opened

        return record_tracked(self, tracking_name, items, decide)
