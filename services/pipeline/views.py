"""What the pipeline API shows and accepts: command bodies and opportunity views."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.pipeline.domain import Opportunity
from shared.contracts.common import NUL_MESSAGE, Money, UtcTime, nul_paths
from shared.contracts.events import Stage


class Command(BaseModel):
    model_config = ConfigDict(extra="forbid")
    expected_version: int = Field(ge=1, description="the version the client last saw")

    @model_validator(mode="before")
    @classmethod
    def _no_nul(cls, data: Any) -> Any:
        """Notes, reasons and competitors go on into read models' text columns: a NUL there
        would stop reporting's consumer, so it is refused here."""
        if nul_paths(data):
            raise ValueError(NUL_MESSAGE)
        return data


class StageCommand(Command):
    to_stage: Stage
    note: str | None = Field(default=None, max_length=2000)


class FollowUpCommand(Command):
    channel: Literal["call", "visit", "email", "meeting", "wechat", "other"]
    summary: str = Field(min_length=1, max_length=2000)
    next_follow_up_at: UtcTime | None = None
    authority: Literal["decision_maker", "influencer", "user", "unknown"] | None = None


class WinCommand(Command):
    contract_amount: Money


class LoseCommand(Command):
    reason_code: str = Field(min_length=1, max_length=40)
    note: str = Field(min_length=1, max_length=2000, description="what happened (SPEC §4)")
    competitor: str | None = Field(default=None, max_length=200)

    @field_validator("note")
    @classmethod
    def _said(cls, note: str) -> str:
        """A lost deal is audited afterwards by what its note says: a blank one says nothing."""
        if not note.strip():
            raise ValueError("a lost deal needs a note saying what happened")
        return note


class ReopenCommand(Command):
    note: str | None = Field(default=None, max_length=2000)


class AssignCommand(Command):
    owner: str | None = Field(default=None, max_length=64)
    team: str | None = Field(default=None, max_length=64)


class PaymentCommand(Command):
    amount: Money


class AmountCommand(Command):
    kind: Literal["expected", "proposal"] = "expected"
    amount: Money


class ProbabilityCommand(Command):
    probability: int = Field(ge=0, le=100)
    note: str | None = Field(default=None, max_length=2000)


class OpportunityView(BaseModel):
    opportunity_id: uuid.UUID
    version: int
    lead_id: uuid.UUID
    lead_ids: list[uuid.UUID]
    title: str
    company: str
    region: str | None
    industry: str | None
    partner_id: str | None
    source: str
    status: str
    stage: str
    probability: int
    probability_overridden: bool
    amount: Money | None
    proposal_amount: Money | None
    contract_amount: Money | None
    received: Money | None
    owner: str | None
    team: str | None
    score: int
    grade: str
    tier: str
    lost_stage: str | None
    expected_close: str | None
    opened_at: UtcTime
    stage_entered_at: UtcTime
    last_activity_at: UtcTime
    as_of: UtcTime | None = None

    @classmethod
    def of(cls, o: Opportunity, as_of: datetime | None = None) -> OpportunityView:
        return cls(
            opportunity_id=o.id, version=o.version, lead_id=o.lead_id, lead_ids=o.lead_ids,
            title=o.title, company=o.company, region=o.region, industry=o.industry,
            partner_id=o.partner_id, source=o.source, status=o.status, stage=o.stage,
            probability=o.probability, probability_overridden=o.probability_overridden,
            amount=o.amount, proposal_amount=o.proposal_amount, contract_amount=o.contract_amount,
            received=o.received, owner=o.owner, team=o.team, score=o.score, grade=o.grade,
            tier=o.tier, lost_stage=o.lost_stage, expected_close=o.expected_close,
            opened_at=o.opened_at, stage_entered_at=o.stage_entered_at,
            last_activity_at=o.last_activity_at, as_of=as_of,
        )  # fmt: skip


class HistoryEntry(BaseModel):
    version: int
    event_type: str
    occurred_at: UtcTime
    actor: str
    data: dict[str, Any]

    @classmethod
    def of(cls, event: Any) -> HistoryEntry:
        """One stored event of an opportunity, as the history and the audits show it."""
        return cls(version=event.originator_version, event_type=event.public_name,
                   occurred_at=event.timestamp, actor=event.payload.get("actor", "system"),
                   data=event.payload)  # fmt: skip


class OpportunityPage(BaseModel):
    items: list[dict[str, Any]]
    total: int
    limit: int
    offset: int


class Refusal(BaseModel):
    code: str
    message: str
    current_version: int | None = None
    detail: dict[str, Any] = Field(default_factory=dict)
