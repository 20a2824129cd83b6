"""The bus contract as an AsyncAPI 3.0 document, generated from the pydantic contracts (served by
capture at `GET /asyncapi`, committed as `docs/asyncapi.json`). Any change to a contract changes
the document; `CONTRACTS_VERSION` must then move on (`dealstream asyncapi --write` refuses to
rewrite a released version's content, and a test holds the committed file to the code)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from shared.contracts import topics
from shared.contracts.envelope import Envelope
from shared.contracts.events import EVENT_TYPES
from shared.contracts.notifications import NOTIFICATION_EVENT_TYPES, NotificationUndeliverable
from shared.contracts.partner import DeadLetter, PartnerLeadMessage, PartnerReply

CONTRACTS_VERSION = "1.3.0"
REF = "#/components/schemas/{model}"

LEAD_EVENT_TYPES = (
    "LeadCaptured",
    "LeadMerged",
    "LeadForgotten",
    "LeadUnmerged",
    "PartnerRegistered",
    "RegistrationConflicted",
    "RegistrationExpired",
)
OPPORTUNITY_EVENT_TYPES = tuple(t for t in EVENT_TYPES if t not in LEAD_EVENT_TYPES)

ENVELOPE_HEADERS = {
    "type": "object",
    "properties": {
        "event-type": {"type": "string"},
        "content-type": {"const": "application/json"},
        "x-notification-id": {"type": "string", "description": "the producer's store position"},
    },
    "required": ["event-type", "content-type"],
}
PARTNER_HEADERS = {
    "type": "object",
    "properties": {
        "x-partner-id": {"type": "string"},
        "x-message-id": {"type": "string", "description": "unique per partner; idempotency key"},
        "x-signature": {"type": "string", "pattern": "^sha256=[0-9a-f]{64}$",
                        "description": "HMAC-SHA256 of the raw value with the partner's secret"},
    },
    "required": ["x-partner-id", "x-message-id", "x-signature"],
}  # fmt: skip


def _message(name: str, payload: dict[str, Any], summary: str, headers: dict[str, Any] | None,
             key: str) -> dict[str, Any]:  # fmt: skip
    message: dict[str, Any] = {
        "name": name,
        "title": name,
        "summary": summary,
        "contentType": "application/json",
        "payload": payload,
        "bindings": {"kafka": {"key": {"type": "string", "description": key}}},
    }
    if headers is not None:
        message["headers"] = headers
    return message


def document() -> dict[str, Any]:
    models: list[type[BaseModel]] = [Envelope, PartnerLeadMessage, PartnerReply, DeadLetter,
                                     NotificationUndeliverable]  # fmt: skip
    models += [model for model, _ in (EVENT_TYPES | NOTIFICATION_EVENT_TYPES).values()]
    _, top = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    schemas: dict[str, Any] = top.get("$defs", {})
    messages: dict[str, Any] = {
        "PartnerLeadMessage": _message(
            "PartnerLeadMessage", {"$ref": REF.format(model="PartnerLeadMessage")},
            "One lead from a channel partner, signed.", PARTNER_HEADERS, "partner_id",
        ),
        "PartnerReply": _message(
            "PartnerReply", {"$ref": REF.format(model="PartnerReply")},
            "The one answer to a partner message.", None, "message_id",
        ),
        "DeadLetter": _message(
            "DeadLetter", {"$ref": REF.format(model="DeadLetter")},
            "What could not be processed, and why.", None, "partner_id",
        ),
        "NotificationUndeliverable": _message(
            "NotificationUndeliverable", {"$ref": REF.format(model="NotificationUndeliverable")},
            "A notification a channel gave up on, with the last error.", None, "notification_id",
        ),
        "Envelope": _message(
            "Envelope", {"$ref": REF.format(model="Envelope")},
            "Any event in the v1 envelope.", ENVELOPE_HEADERS, "stream_id",
        ),
    }  # fmt: skip
    for event_type, (model, version) in (EVENT_TYPES | NOTIFICATION_EVENT_TYPES).items():
        payload = {
            "allOf": [
                {"$ref": REF.format(model="Envelope")},
                {
                    "type": "object",
                    "properties": {
                        "event_type": {"const": event_type},
                        "schema_version": {"const": version},
                        "data": {"$ref": REF.format(model=model.__name__)},
                    },
                },
            ]
        }
        messages[event_type] = _message(event_type, payload, f"{event_type} (schema v{version})",
                                        ENVELOPE_HEADERS, "stream_id")  # fmt: skip

    def refs(*names: str) -> dict[str, Any]:
        return {n: {"$ref": f"#/components/messages/{n}"} for n in names}

    channels = {
        "partnerLeads": {"address": topics.PARTNER_LEADS, "messages": refs("PartnerLeadMessage")},
        "partnerReplies": {
            "address": "partner.{partner_id}.replies.v1",
            "parameters": {"partner_id": {"description": "the partner's id"}},
            "messages": refs("PartnerReply"),
        },
        "leadEvents": {"address": topics.LEAD_EVENTS, "messages": refs(*LEAD_EVENT_TYPES)},
        "opportunityEvents": {
            "address": topics.OPPORTUNITY_EVENTS,
            "messages": refs(*OPPORTUNITY_EVENT_TYPES),
        },
        "notificationEvents": {
            "address": topics.NOTIFICATION_EVENTS,
            "messages": refs(*NOTIFICATION_EVENT_TYPES),
        },
        "deadLetter": {
            "address": topics.DEAD_LETTER,
            "messages": refs("DeadLetter", "NotificationUndeliverable"),
        },
    }

    def operation(action: str, channel: str, summary: str) -> dict[str, Any]:
        return {"action": action, "channel": {"$ref": f"#/channels/{channel}"}, "summary": summary}

    operations = {
        "submitLead": operation("send", "partnerLeads", "A partner submits a lead."),
        "receiveReply": operation("receive", "partnerReplies", "A partner reads its answers."),
        "leadEvents": operation("receive", "leadEvents", "Subscribe to captured and merged leads."),
        "opportunityEvents": operation(
            "receive", "opportunityEvents", "Subscribe to every opportunity event, in order per id."
        ),
        "notificationEvents": operation("receive", "notificationEvents", "Notifications sent."),
        "deadLetters": operation("receive", "deadLetter", "Operations read what was refused."),
    }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "DealStream bus",
            "version": CONTRACTS_VERSION,
            "description": "Kafka topics of DealStream. Keys keep each stream on one partition; "
            "every topic has at least 6 partitions. Money is a decimal string with a currency; "
            "times are UTC ISO-8601 with Z.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": schemas},
    }


def canonical(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def fingerprint(doc: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(doc).encode()).hexdigest()
