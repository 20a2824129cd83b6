"""Pure pipeline rules: BANT scoring, tiers by amount, routing of new opportunities."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

from shared.contracts.common import Money
from shared.contracts.events import LeadCaptured
from shared.settings import Directory, Routing, Tiers

AUTHORITY_POINTS = {"decision_maker": 25, "influencer": 15, "user": 5, "unknown": 0}
TIMELINE_POINTS = {"this_month": 25, "this_quarter": 20, "this_year": 10, "unknown": 0}


@dataclass(frozen=True)
class Score:
    budget: int
    authority: int
    need: int
    timeline: int

    @property
    def total(self) -> int:
        return self.budget + self.authority + self.need + self.timeline

    @property
    def grade(self) -> str:
        total = self.total
        return "A" if total >= 75 else "B" if total >= 50 else "C" if total >= 25 else "D"


def bant(lead: LeadCaptured) -> Score:
    """Budget, authority, need, timeline: up to 25 points each."""
    return Score(
        budget=25 if lead.budget is not None and lead.budget.amount > 0 else 0,
        authority=AUTHORITY_POINTS[lead.authority.value],
        need=25 if lead.need and lead.need.strip() else 0,
        timeline=TIMELINE_POINTS[lead.timeline.value],
    )


def tier(amount: Money | None, tiers: Tiers) -> str:
    """The tier of an amount, in CNY (at the configured rate, if it is in another currency)."""
    value = amount.amount if amount is not None else Decimal(0)
    if amount is not None and amount.currency != "CNY":
        value *= tiers.cny_per.get(amount.currency, Decimal(1))
    if value < tiers.small_below:
        return "small"
    if value < tiers.normal_below:
        return "normal"
    if value < tiers.important_below:
        return "important"
    return "major"


@dataclass(frozen=True)
class Route:
    owner: str | None
    team: str | None
    rule: str


def route(
    lead: LeadCaptured, directory: Directory, routing: Routing, loads: Mapping[str, int]
) -> Route:
    """The first routing rule matching region, industry and partner names the team; within the
    team the least-loaded rep under the load cap takes it (ties by id: a round robin)."""
    team, rule_name = routing.default_team, "default_team"
    for number, rule in enumerate(routing.rules, start=1):
        if (
            (rule.region is None or rule.region == lead.company.region)
            and (rule.industry is None or rule.industry == lead.company.industry)
            and (rule.partner is None or rule.partner == lead.partner_id)
        ):
            team, rule_name = rule.team, f"routing_rule_{number}"
            break
    if team is None:
        return Route(None, None, "no_rule")
    candidates = sorted(
        (loads.get(rep.id, 0), rep.id)
        for rep in directory.reps(team)
        if loads.get(rep.id, 0) < routing.load_cap
    )
    if not candidates:
        return Route(None, team, f"{rule_name}:team_at_capacity")
    return Route(candidates[0][1], team, rule_name)
