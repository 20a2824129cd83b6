"""Pydantic models of every public message and the topic names: the one source of the bus
contract."""

from shared.contracts.common import Money
from shared.contracts.envelope import Envelope, event_id_for
from shared.contracts.events import (
    EVENT_TYPES,
    LeadCaptured,
    OpportunityOpened,
    OpportunityStageChanged,
    parse_event_data,
)
from shared.contracts.partner import (
    DeadLetter,
    FieldError,
    PartnerLeadMessage,
    PartnerReply,
    ReplyStatus,
    WebFormLead,
)

__all__ = [
    "EVENT_TYPES",
    "DeadLetter",
    "Envelope",
    "FieldError",
    "LeadCaptured",
    "Money",
    "OpportunityOpened",
    "OpportunityStageChanged",
    "PartnerLeadMessage",
    "PartnerReply",
    "ReplyStatus",
    "WebFormLead",
    "event_id_for",
    "parse_event_data",
]
