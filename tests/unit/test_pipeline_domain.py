"""Opening opportunities from leads and moving stages (SPEC §4)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from services.pipeline.domain import Opportunity, StageRefused, opportunity_id_for
from shared.contracts.events import LeadCaptured
from shared.settings import Rules

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def lead() -> LeadCaptured:
    return LeadCaptured.model_validate(
        {
            "lead_id": str(uuid.uuid4()),
            "source": "partner",
            "partner_id": "acme",
            "message_id": "acme-1",
            "captured_at": "2026-11-22T09:00:00Z",
            "company": {"name": "Northwind", "region": "CN-SN"},
            "contact": {"name": "Li Wei"},
            "budget": {"amount": "350000.00", "currency": "CNY"},
        }
    )


def test_a_lead_opens_one_opportunity_in_stage_a_with_its_probability() -> None:
    captured = lead()
    opportunity = Opportunity.open_from_lead(captured, Rules(), "event-1", "corr-1")
    assert opportunity.id == opportunity_id_for(captured.lead_id)
    assert (opportunity.stage, opportunity.probability) == ("A", 10)
    [opened] = opportunity.collect_events()
    assert opened.payload["amount"] == {"amount": "350000.00", "currency": "CNY"}
    assert opened.causation_id == "event-1" and opened.correlation_id == "corr-1"


def test_forward_one_stage_at_a_time_and_back_only_with_a_note() -> None:
    opportunity = Opportunity.open_from_lead(lead(), Rules(), "e", "c")
    opportunity.change_stage("B", "rep1", NOW, Rules())
    assert (opportunity.stage, opportunity.probability) == ("B", 25)
    with pytest.raises(StageRefused) as skip:
        opportunity.change_stage("D", "rep1", NOW, Rules())
    assert skip.value.code == "stage_skip"
    with pytest.raises(StageRefused) as back:
        opportunity.change_stage("A", "rep1", NOW, Rules())
    assert back.value.code == "note_required"
    opportunity.change_stage("A", "rep1", NOW, Rules(), note="budget withdrawn")
    assert opportunity.stage == "A"
    events = opportunity.collect_events()
    assert [type(e).__name__ for e in events] == ["Opened", "StageChanged", "StageChanged"]
    assert events[1].payload["from_stage"] == "A" and events[1].payload["to_stage"] == "B"
