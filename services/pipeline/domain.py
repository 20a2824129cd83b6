"""Opportunity rules and the aggregate, free of I/O: opening from a captured lead, and stage
moves (forward one stage at a time; back with a note)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, ClassVar

from eventsourcing.domain import Aggregate

from shared.contracts.events import LeadCaptured, OpportunityOpened, OpportunityStageChanged
from shared.settings import STAGES, Rules

OPPORTUNITY_NAMESPACE = uuid.UUID("c2f0d8a4-1b7e-4f3a-9e61-7d2b5a9c4e08")


def opportunity_id_for(lead_id: uuid.UUID) -> uuid.UUID:
    """One lead opens one opportunity, however often its event is delivered."""
    return uuid.uuid5(OPPORTUNITY_NAMESPACE, str(lead_id))


class StageRefused(Exception):
    """A stage move the rules refuse; `code` is stable and public."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Opportunity(Aggregate):
    class Opened(Aggregate.Created):
        public_name: ClassVar[str] = "OpportunityOpened"
        payload: dict[str, Any]
        correlation_id: str
        causation_id: str

    class StageChanged(Aggregate.Event):
        public_name: ClassVar[str] = "OpportunityStageChanged"
        payload: dict[str, Any]
        correlation_id: str
        causation_id: str

        def apply(self, aggregate: Aggregate) -> None:
            assert isinstance(aggregate, Opportunity)
            aggregate.stage = self.payload["to_stage"]
            aggregate.probability = self.payload["probability"]

    def __init__(self, payload: dict[str, Any], correlation_id: str, causation_id: str) -> None:
        self.lead_id = uuid.UUID(payload["lead_id"])
        self.stage: str = payload["stage"]
        self.probability: int = payload["probability"]
        self.correlation_id = correlation_id

    @classmethod
    def open_from_lead(
        cls, lead: LeadCaptured, rules: Rules, event_id: str, correlation_id: str
    ) -> Opportunity:
        opportunity_id = opportunity_id_for(lead.lead_id)
        title = lead.company.name if not lead.need else f"{lead.company.name}: {lead.need}"
        opened = OpportunityOpened(
            opportunity_id=opportunity_id,
            lead_id=lead.lead_id,
            title=title[:200],
            stage="A",
            probability=rules.probability("A"),
            amount=lead.budget,
            source=lead.source,
            partner_id=lead.partner_id,
            company=lead.company.name,
            region=lead.company.region,
            industry=lead.company.industry,
            expected_close=lead.expected_close.isoformat() if lead.expected_close else None,
            opened_at=lead.captured_at,
        )
        return cls._create(
            cls.Opened,
            id=opportunity_id,
            payload=opened.model_dump(mode="json"),
            correlation_id=correlation_id,
            causation_id=event_id,
        )

    def change_stage(
        self,
        to_stage: str,
        actor: str,
        now: datetime,
        rules: Rules,
        note: str | None = None,
        correlation_id: str = "",
        causation_id: str = "",
    ) -> None:
        if to_stage not in STAGES:
            raise StageRefused("unknown_stage", f"no stage {to_stage!r}")
        step = STAGES.index(to_stage) - STAGES.index(self.stage)
        if step == 0:
            raise StageRefused("same_stage", f"already in stage {to_stage}")
        if step > 1:
            raise StageRefused("stage_skip", f"cannot skip from {self.stage} to {to_stage}")
        if step < 0 and not (note and note.strip()):
            raise StageRefused("note_required", "moving back needs a note")
        changed = OpportunityStageChanged(
            opportunity_id=self.id,
            from_stage=self.stage,
            to_stage=to_stage,
            probability=rules.probability(to_stage),
            actor=actor,
            note=note,
            changed_at=now,
        )
        self.trigger_event(
            self.StageChanged,
            payload=changed.model_dump(mode="json"),
            correlation_id=correlation_id,
            causation_id=causation_id,
        )
