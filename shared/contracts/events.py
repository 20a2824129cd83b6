"""Payloads (`data`) of the events on `lead.events.v1` and `opportunity.events.v1`.

Each event type maps to one pydantic model and a schema version; producers serialise through
these and consumers validate through them. Old versions are upcast, never edited.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError

from shared.contracts.common import FROM_BUS, Contract, Money, UtcTime
from shared.contracts.partner import Channel, LeadDetails


class LeadCaptured(LeadDetails):
    lead_id: uuid.UUID
    source: str  # "partner" or a web channel
    channel: Channel | None = None
    partner_id: str | None = None
    message_id: str | None = None
    captured_at: UtcTime
    # Set when capture's dedupe recognised a known customer: a LeadMerged event follows, and
    # no second opportunity is opened for it.
    duplicate_of: uuid.UUID | None = None


class LeadMerged(Contract):
    """Capture's dedupe: `lead_id` is the same customer as `into_lead_id`, by `rule`."""

    lead_id: uuid.UUID
    into_lead_id: uuid.UUID
    rule: str
    merged_at: UtcTime


class UnmergedLead(LeadCaptured):
    """A lead as captured, for the deal it opens once it is unmerged: without its contact (the
    lead's LeadCaptured carries that, and `forget` erases it there), and no longer a duplicate."""

    contact: None = None  # type: ignore[assignment]


class LeadUnmerged(Contract):
    """A merge undone (SPEC §3): `lead_id` is not the customer `from_lead_id` after all. It is a
    customer of its own now, and opens a deal of its own (`lead`: what it was captured with)."""

    lead_id: uuid.UUID
    from_lead_id: uuid.UUID
    rule: str  # the rule of the merge undone
    actor: str
    note: str | None = Field(default=None, max_length=2000)
    unmerged_at: UtcTime
    lead: UnmergedLead


class LeadForgotten(Contract):
    """The lead's contact data was erased on request (PIPL/GDPR): its key is destroyed, and
    every read of its events shows the contact as erased from now on."""

    lead_id: uuid.UUID
    forgotten_at: UtcTime


class PartnerRegistered(Contract):
    """Deal registration (报备): the first partner to submit a company holds it until expiry."""

    registration_id: uuid.UUID
    partner_id: str
    lead_id: uuid.UUID
    company: str
    region: str | None = None
    company_key: str
    registered_at: UtcTime
    expires_at: UtcTime


class RegistrationConflicted(Contract):
    """Another partner submitted the company while the registration held."""

    registration_id: uuid.UUID
    partner_id: str
    lead_id: uuid.UUID
    at: UtcTime


class RegistrationExpired(Contract):
    registration_id: uuid.UUID
    partner_id: str
    expired_at: UtcTime


Stage = Annotated[str, Field(pattern=r"^[A-F]$")]
Tier = Literal["small", "normal", "important", "major"]


class OpportunityOpened(Contract):
    opportunity_id: uuid.UUID
    lead_id: uuid.UUID
    title: str
    stage: Stage
    probability: int = Field(ge=0, le=100)
    amount: Money | None = None
    source: str
    partner_id: str | None = None
    company: str
    region: str | None = None
    industry: str | None = None
    authority: str = "unknown"
    expected_close: str | None = None
    opened_at: UtcTime


class OpportunityScored(Contract):
    opportunity_id: uuid.UUID
    score: int = Field(ge=0, le=100)
    grade: Literal["A", "B", "C", "D"]
    budget: int
    authority: int
    need: int
    timeline: int
    tier: Tier


class OpportunityAssigned(Contract):
    opportunity_id: uuid.UUID
    owner: str | None
    team: str | None
    previous_owner: str | None = None
    rule: str
    actor: str
    assigned_at: UtcTime


class OpportunityStageChanged(Contract):
    opportunity_id: uuid.UUID
    from_stage: Stage
    to_stage: Stage
    probability: int = Field(ge=0, le=100)
    actor: str
    note: str | None = None
    changed_at: UtcTime


class OpportunityProbabilityOverridden(Contract):
    opportunity_id: uuid.UUID
    stage: Stage
    probability: int = Field(ge=0, le=100)
    previous: int = Field(ge=0, le=100)
    actor: str
    note: str | None = None
    overridden_at: UtcTime


class FollowUpLogged(Contract):
    opportunity_id: uuid.UUID
    channel: Literal["call", "visit", "email", "meeting", "wechat", "other"]
    summary: str
    next_follow_up_at: UtcTime | None = None
    # What the rep learned of who decides (B's exit criterion needs a decision maker).
    authority: Literal["decision_maker", "influencer", "user", "unknown"] | None = None
    stage: Stage
    actor: str
    logged_at: UtcTime


class OpportunityAmountChanged(Contract):
    opportunity_id: uuid.UUID
    kind: Literal["expected", "proposal"]
    amount: Money
    previous: Money | None = None
    tier: Tier
    actor: str
    changed_at: UtcTime


class OpportunityWon(Contract):
    opportunity_id: uuid.UUID
    contract_amount: Money
    from_stage: Stage
    actor: str
    won_at: UtcTime


class PaymentReceived(Contract):
    opportunity_id: uuid.UUID
    amount: Money
    total_received: Money
    actor: str
    received_at: UtcTime


class OpportunityLost(Contract):
    opportunity_id: uuid.UUID
    reason_code: str
    note: str | None = None
    competitor: str | None = None
    stage: Stage
    actor: str
    lost_at: UtcTime


class OpportunityReopened(Contract):
    opportunity_id: uuid.UUID
    stage: Stage
    probability: int = Field(ge=0, le=100)
    actor: str
    note: str | None = None
    reopened_at: UtcTime


class OpportunityRecycled(Contract):
    opportunity_id: uuid.UUID
    previous_owner: str | None
    team: str | None
    idle_since: UtcTime
    idle_days: int
    actor: str
    recycled_at: UtcTime


class OpportunityReactivated(Contract):
    opportunity_id: uuid.UUID
    owner: str | None
    team: str | None
    actor: str
    reactivated_at: UtcTime


class LeadAttached(Contract):
    """A lead merged by capture's dedupe joins the opportunity of the lead it was merged into."""

    opportunity_id: uuid.UUID
    lead_id: uuid.UUID
    rule: str
    attached_at: UtcTime


class LeadDetached(Contract):
    """A lead attached to this opportunity was unmerged (LeadUnmerged): it has a deal of its own
    (`to_opportunity_id`) from now on."""

    opportunity_id: uuid.UUID
    lead_id: uuid.UUID
    to_opportunity_id: uuid.UUID
    actor: str
    detached_at: UtcTime


EVENT_TYPES: dict[str, tuple[type[Contract], int]] = {
    "LeadCaptured": (LeadCaptured, 1),
    "LeadMerged": (LeadMerged, 1),
    "LeadForgotten": (LeadForgotten, 1),
    "LeadUnmerged": (LeadUnmerged, 1),
    "PartnerRegistered": (PartnerRegistered, 1),
    "RegistrationConflicted": (RegistrationConflicted, 1),
    "RegistrationExpired": (RegistrationExpired, 1),
    "OpportunityOpened": (OpportunityOpened, 1),
    "OpportunityScored": (OpportunityScored, 1),
    "OpportunityAssigned": (OpportunityAssigned, 1),
    "OpportunityStageChanged": (OpportunityStageChanged, 1),
    "OpportunityProbabilityOverridden": (OpportunityProbabilityOverridden, 1),
    "FollowUpLogged": (FollowUpLogged, 1),
    "OpportunityAmountChanged": (OpportunityAmountChanged, 1),
    "OpportunityWon": (OpportunityWon, 1),
    "PaymentReceived": (PaymentReceived, 1),
    "OpportunityLost": (OpportunityLost, 1),
    "OpportunityReopened": (OpportunityReopened, 1),
    "OpportunityRecycled": (OpportunityRecycled, 1),
    "OpportunityReactivated": (OpportunityReactivated, 1),
    "LeadAttached": (LeadAttached, 1),
    "LeadDetached": (LeadDetached, 1),
}


def parse_event_data(
    event_type: str, data: dict[str, Any], context: dict[str, Any] | None = None
) -> Contract:
    """Validate an envelope's `data` against its event type's contract. Read off the bus
    (FROM_BUS in `context`), fields this code does not know are ignored: a producer may add an
    optional field within a schema version (SPEC §2), and a consumer not yet upgraded reads on
    (at the edge, where partners write, they are refused)."""
    try:
        model, _ = EVENT_TYPES[event_type]
    except KeyError:
        raise ValueError(f"unknown event type {event_type!r}") from None
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        unknown = [e["loc"] for e in exc.errors() if e["type"] == "extra_forbidden"]
        if not (context and context.get(FROM_BUS)) or len(unknown) < len(exc.errors()):
            raise
        return model.model_validate(_without(data, unknown), context=context)


def _without(data: Any, paths: list[tuple[int | str, ...]]) -> Any:
    """`data` without the values at `paths` (a copy; the envelope's own data stays whole)."""
    if not paths:
        return data
    if isinstance(data, dict):
        dropped = {path[0] for path in paths if len(path) == 1}
        return {
            key: _without(value, [p[1:] for p in paths if len(p) > 1 and p[0] == key])
            for key, value in data.items()
            if key not in dropped
        }
    if isinstance(data, list):
        return [
            _without(value, [p[1:] for p in paths if len(p) > 1 and p[0] == index])
            for index, value in enumerate(data)
        ]
    return data


def schema_version_of(event_type: str) -> int:
    return EVENT_TYPES[event_type][1]
