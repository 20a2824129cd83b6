"""The v1 topic names of SPEC §1. Public: change only by adding a new version."""

from __future__ import annotations

import re

PARTNER_LEADS = "partner.leads.v1"
LEAD_EVENTS = "lead.events.v1"
OPPORTUNITY_EVENTS = "opportunity.events.v1"
NOTIFICATION_EVENTS = "notification.events.v1"
DEAD_LETTER = "dead-letter.v1"

CORE_TOPICS: tuple[str, ...] = (
    PARTNER_LEADS,
    LEAD_EVENTS,
    OPPORTUNITY_EVENTS,
    NOTIFICATION_EVENTS,
    DEAD_LETTER,
)

PARTNER_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{1,63}$")


def partner_replies(partner_id: str) -> str:
    """The replies topic of one partner: `partner.<partner_id>.replies.v1`."""
    if not PARTNER_ID_PATTERN.match(partner_id):
        raise ValueError(f"invalid partner id {partner_id!r}")
    return f"partner.{partner_id}.replies.v1"
