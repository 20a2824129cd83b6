"""Opportunity lives for notify's tests, made by pipeline's own aggregate (so notify reads exactly
what pipeline publishes), and a directory with a team in Shanghai and one in Berlin."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from services.pipeline.domain import Opportunity
from services.pipeline.rules import Route
from shared.bus.envelopes import envelope_of
from shared.contracts.envelope import Envelope
from shared.contracts.events import LeadCaptured
from shared.settings import Rules

DIRECTORY: dict[str, Any] = {
    "users": [
        {"id": "rep.wang", "team": "east", "email": "wang@example.cn", "locale": "zh-CN"},
        {"id": "rep.li", "team": "east", "email": "li@example.cn", "locale": "zh-CN"},
        {"id": "mgr.zhao", "team": "east", "role": "manager", "email": "zhao@example.cn"},
        {"id": "vp.sun", "role": "branch_manager", "email": "sun@example.cn"},
        {"id": "rep.anna", "team": "berlin", "email": "anna@example.de", "locale": "en",
         "timezone": "Europe/Berlin"},
        {"id": "mgr.karl", "team": "berlin", "role": "manager", "email": "karl@example.de",
         "locale": "en", "timezone": "Europe/Berlin"},
    ],
    "teams": [
        {"id": "east", "manager": "mgr.zhao", "branch_manager": "vp.sun"},
        {"id": "berlin", "manager": "mgr.karl", "branch_manager": "vp.sun",
         "timezone": "Europe/Berlin"},
    ],
}  # fmt: skip
RULES = Rules.model_validate({"directory": DIRECTORY})
DIRECTORY_TOML = """
[[directory.users]]
id = "rep.wang"
team = "east"
email = "wang@example.cn"

[[directory.users]]
id = "mgr.zhao"
team = "east"
role = "manager"
email = "zhao@example.cn"
locale = "en"

[[directory.teams]]
id = "east"
manager = "mgr.zhao"
branch_manager = "vp.sun"
"""


class Deal:
    """One opportunity driven through pipeline's aggregate; `take()` returns the envelopes of the
    events since the last call, as the relay would publish them."""

    def __init__(
        self,
        opened_at: datetime,
        owner: str | None = "rep.wang",
        team: str | None = "east",
        amount: str = "30000.00",
        rules: Rules = RULES,
        company: str | None = None,
        **lead: Any,
    ) -> None:
        self.rules = rules
        captured = LeadCaptured.model_validate(
            {
                "lead_id": str(uuid.uuid4()),
                "source": "partner",
                "partner_id": "acme",
                "captured_at": opened_at,
                "company": {"name": company or f"Co {uuid.uuid4().hex[:6]}", "region": "CN-SH"},
                "contact": {"name": "Li Wei"},
                "budget": {"amount": amount, "currency": "CNY"},
                **lead,
            }
        )
        self.o = Opportunity.open_from_lead(
            captured, rules, Route(owner, team, "test"), "lead-event", "c-1"
        )
        self.log: list[Envelope] = []

    @property
    def id(self) -> uuid.UUID:
        return self.o.id

    def take(self) -> list[Envelope]:
        fresh = [envelope_of(e) for e in self.o.collect_events()]
        self.log += fresh
        return fresh
