"""A scripted year of opportunities for the reporting tests, told once as data: the driver plays
it through pipeline's and capture's own aggregates (so reporting reads exactly what they
publish), and the oracle works every expected figure out of the same script in plain Python —
independently of reporting's SQL."""

from __future__ import annotations

import itertools
import statistics
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from services.capture.domain import Registration
from services.pipeline.domain import Opportunity
from services.pipeline.rules import Route, tier
from shared.bus.envelopes import envelope_of
from shared.contracts.common import Money
from shared.contracts.envelope import Envelope
from shared.contracts.events import LeadCaptured
from shared.settings import STAGES, Rules

RULES = Rules()


def at(day: str, hour: int = 10) -> datetime:
    return datetime.fromisoformat(f"2026-{day}T{hour:02d}:00:00+00:00")


# deal: (opened, owner, team, amount, expected close, partner)
DEALS: dict[str, tuple[str, str, str, str, str | None, str | None]] = {
    "d1": ("01-05", "rep.wang", "east", "30000", "2026-02-28", None),
    "d2": ("01-12", "rep.li", "east", "100000", "2026-03-31", None),
    "d3": ("02-03", "rep.anna", "west", "250000", "2026-04-30", None),
    "d4": ("02-15", "rep.wang", "east", "15000", None, None),
    "d5": ("03-01", "rep.li", "east", "50000", "2026-05-31", "acme"),
    "d6": ("01-20", "rep.anna", "west", "80000", "2026-03-31", "bolt"),
    "d7": ("03-10", "rep.wang", "east", "20000", "2026-04-30", None),
    "d8": ("04-02", "rep.anna", "west", "60000", "2026-05-15", None),
    "d9": ("04-03", "rep.li", "east", "45000", "2026-06-30", None),
}
# (day, deal, action, argument)
SCRIPT: list[tuple[str, str, str, str | None]] = [
    ("01-10", "d1", "stage", "B"), ("01-15", "d2", "stage", "B"), ("01-20", "d1", "stage", "C"),
    ("01-25", "d1", "proposal", "32000"), ("02-01", "d1", "stage", "D"),
    ("02-01", "d6", "stage", "B"), ("02-05", "d2", "lose", "price"),
    ("02-10", "d1", "stage", "E"), ("02-10", "d3", "stage", "B"), ("02-10", "d6", "stage", "C"),
    ("02-15", "d6", "proposal", "80000"), ("02-20", "d1", "win", "31000"),
    ("02-20", "d3", "stage", "C"), ("02-20", "d4", "assign", "rep.li"),
    ("02-20", "d6", "stage", "D"), ("02-25", "d3", "back", "B"), ("03-01", "d3", "stage", "C"),
    ("03-01", "d6", "stage", "E"), ("03-05", "d1", "pay", "10000"), ("03-05", "d5", "stage", "B"),
    ("03-10", "d4", "lose", "no_budget"), ("03-12", "d5", "stage", "C"),
    ("03-15", "d3", "lose", "competitor"), ("03-15", "d7", "stage", "B"),
    ("03-18", "d5", "proposal", "50000"), ("03-20", "d3", "reopen", None),
    ("03-20", "d5", "stage", "D"), ("03-22", "d3", "proposal", "240000"),
    ("03-25", "d3", "stage", "D"), ("03-28", "d5", "stage", "E"), ("03-30", "d6", "win", "80000"),
    ("04-01", "d3", "stage", "E"), ("04-05", "d5", "win", "50000"), ("04-10", "d1", "pay", "21000"),
    ("04-12", "d6", "pay", "30000"), ("04-15", "d3", "win", "240000"),
    ("05-03", "d5", "pay", "20000"), ("05-10", "d3", "pay", "240000"),
]  # fmt: skip
# Partner registrations (报备): (partner, deal, registered on, days held); one conflict.
REGISTRATIONS = [("acme", "d5", "02-28", 90), ("bolt", "d6", "01-19", 41)]
CONFLICT = ("carl", "d5", "03-02")
NOW = at("05-20", 12)  # after the last event: "now" is the whole story


def money(amount: str | Decimal) -> Money:
    return Money(amount=str(amount), currency="CNY")


# -- the driver ---------------------------------------------------------------------------------


@dataclass
class Played:
    envelopes: list[Envelope]
    ids: dict[str, uuid.UUID]


def play(rules: Rules = RULES) -> Played:
    """Every event of the scenario, in the order the relays would publish them."""
    aggregates: dict[str, Opportunity] = {}
    leads: dict[str, LeadCaptured] = {}
    timeline: list[tuple[datetime, int, Envelope]] = []

    def take(name: str, when: datetime, seq: int) -> None:
        for event in aggregates[name].collect_events():
            timeline.append((when, seq, envelope_of(event)))

    for seq, (name, (opened, owner, team, amount, close, partner)) in enumerate(DEALS.items()):
        lead = LeadCaptured.model_validate({
            "lead_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"scenario/{name}")),
            "source": "partner" if partner else "web_form", "partner_id": partner,
            "captured_at": at(opened), "company": {"name": f"{name} Co", "region": "CN-SH"},
            "contact": {"name": "Li Wei"}, "budget": {"amount": amount, "currency": "CNY"},
            "authority": "decision_maker", "expected_close": close,
        })  # fmt: skip
        leads[name] = lead
        aggregates[name] = Opportunity.open_from_lead(lead, rules, Route(owner, team, "test"),
                                                      "e", "c")  # fmt: skip
        take(name, at(opened), seq)
    for seq, (day, name, action, arg) in enumerate(SCRIPT, start=100):
        o, when = aggregates[name], at(day)
        if action == "stage":
            o.change_stage(str(arg), o.owner or "x", when, rules)
        elif action == "back":
            o.change_stage(str(arg), o.owner or "x", when, rules, note="not yet decided")
        elif action == "proposal":
            o.change_amount("proposal", money(str(arg)), o.owner or "x", when, rules)
        elif action == "win":
            o.win(money(str(arg)), o.owner or "x", when, RULES)
        elif action == "pay":
            o.receive_payment(money(str(arg)), "finance", when)
        elif action == "lose":
            o.lose(str(arg), o.owner or "x", when, rules, note="n")
        elif action == "reopen":
            o.reopen("mgr", when, rules, note="they called back")
        elif action == "assign":
            o.assign(str(arg), o.team, "mgr", when)
        take(name, when, seq)
    for seq, (partner, name, day, days) in enumerate(REGISTRATIONS, start=1000):
        lead = leads[name]
        registration = Registration.register(partner, lead, lead.lead_id, f"{name} co", at(day, 9),
                                             days, "c")  # fmt: skip
        if name == CONFLICT[1]:
            registration.conflict(CONFLICT[0], uuid.uuid4(), at(CONFLICT[2]), "c")
        if at(day, 9) + timedelta(days=days) <= NOW:
            registration.expire(at(day, 9) + timedelta(days=days))
        for event in registration.collect_events():
            envelope = envelope_of(event)
            timeline.append((envelope.occurred_at, seq, envelope))
    timeline.sort(key=lambda item: (item[0], item[1], item[2].stream_version))
    return Played([e for _, _, e in timeline], {n: o.id for n, o in aggregates.items()})


# -- the oracle ---------------------------------------------------------------------------------


@dataclass
class Deal:
    name: str
    opened_at: datetime
    owner: str
    team: str
    amount: Decimal
    expected_close: date | None
    partner: str | None
    stage: str = "A"
    status: str = "open"
    reached: str = "A"
    entered_at: datetime | None = None
    won_at: datetime | None = None
    won_amount: Decimal | None = None
    lost_at: datetime | None = None
    lost_stage: str | None = None
    reason: str | None = None
    stays: list[tuple[str, datetime, datetime]] = field(default_factory=list)
    payments: list[tuple[datetime, Decimal]] = field(default_factory=list)

    @property
    def tier(self) -> str:
        return tier(money(self.amount), RULES.tiers)


def deals_at(when: datetime) -> dict[str, Deal]:
    """The scenario as it stood at `when`."""
    deals = {}
    for name, (opened, owner, team, amount, close, partner) in DEALS.items():
        if at(opened) <= when:
            deals[name] = Deal(name, at(opened), owner, team, Decimal(amount),
                               date.fromisoformat(close) if close else None, partner,
                               entered_at=at(opened))  # fmt: skip
    for day, name, action, arg in SCRIPT:
        t = at(day)
        if t > when:
            break
        d = deals[name]
        if action in ("stage", "back"):
            d.stays.append((d.stage, d.entered_at, t))  # type: ignore[arg-type]
            d.stage, d.entered_at = str(arg), t
            d.reached = max(d.reached, d.stage)
        elif action == "proposal":
            d.amount = Decimal(str(arg))
        elif action == "win":
            d.stays.append((d.stage, d.entered_at, t))  # type: ignore[arg-type]
            d.stage, d.status, d.reached, d.won_at = "F", "won", "F", t
            d.won_amount = Decimal(str(arg))
        elif action == "pay":
            d.payments.append((t, Decimal(str(arg))))
        elif action == "lose":
            d.stays.append((d.stage, d.entered_at, t))  # type: ignore[arg-type]
            d.status, d.lost_at, d.lost_stage, d.reason = "lost", t, d.stage, str(arg)
        elif action == "reopen":
            d.status, d.entered_at, d.lost_at, d.lost_stage, d.reason = "open", t, None, None, None
        elif action == "assign":
            d.owner = str(arg)
    return deals


def ratio(part: Decimal | int, whole: Decimal | int) -> str | None:
    return None if not whole else str((Decimal(part) / Decimal(whole)).quantize(Decimal("0.0001")))


def cents(value: Decimal | int) -> str:
    return str(Decimal(value).quantize(Decimal("0.01")))


def percentile_cont(values: list[float], p: float) -> float:
    ordered = sorted(values)
    position = p * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def day_stats(values: list[float]) -> dict[str, Any]:
    two = Decimal("0.01")
    return {
        "n": len(values),
        "mean_days": str(Decimal(statistics.fmean(values)).quantize(two)),
        "median_days": str(Decimal(percentile_cont(values, 0.5)).quantize(two)),
        "p90_days": str(Decimal(percentile_cont(values, 0.9)).quantize(two)),
    }


def funnel(when: datetime) -> dict[str, tuple[int, str, str]]:
    """stage -> (count, amount, weighted) of the open opportunities."""
    found: dict[str, tuple[int, str, str]] = {}
    for stage in STAGES:
        open_here = [d for d in deals_at(when).values() if d.status == "open" and d.stage == stage]
        weighted = sum(d.amount * RULES.probability(stage) / 100 for d in open_here)
        found[stage] = (len(open_here), cents(sum(d.amount for d in open_here)), cents(weighted))
    return found


def pass_through(start: datetime, end: datetime) -> dict[str, tuple[int, int, str | None]]:
    cohort = [d for d in deals_at(NOW).values() if start <= d.opened_at < end]
    reached = {s: sum(1 for d in cohort if d.reached >= s) for s in STAGES}
    return {s: (reached[s], reached[n], ratio(reached[n], reached[s]))
            for s, n in itertools.pairwise(STAGES)}  # fmt: skip


def win_rate(start: datetime, end: datetime, team: str | None = None) -> dict[str, Any]:
    deals = [d for d in deals_at(NOW).values() if team is None or d.team == team]
    won = [d for d in deals if d.status == "won" and start <= d.won_at < end]  # type: ignore[operator]
    lost = [d for d in deals if d.status == "lost" and start <= d.lost_at < end]  # type: ignore[operator]
    won_amount, lost_amount = sum(d.amount for d in won), sum(d.amount for d in lost)
    return {"won": len(won), "lost": len(lost), "count_rate": ratio(len(won), len(won) + len(lost)),
            "won_amount": cents(won_amount), "lost_amount": cents(lost_amount),
            "amount_rate": ratio(won_amount, won_amount + lost_amount),
            "contract_amount": cents(sum(d.won_amount or 0 for d in won))}  # fmt: skip


def cycle_time(start: datetime, end: datetime) -> dict[str, dict[str, Any]]:
    deals = deals_at(NOW).values()
    found = {}
    won = [(d.won_at - d.opened_at).total_seconds() / 86400 for d in deals  # type: ignore[operator]
           if d.status == "won" and start <= d.won_at < end]  # type: ignore[operator]  # fmt: skip
    if won:
        found["created_to_won"] = day_stats(won)
    per_stage: dict[str, list[float]] = defaultdict(list)
    for d in deals:
        for stage, entered, left in d.stays:
            if start <= left < end:
                per_stage[stage].append((left - entered).total_seconds() / 86400)
    for stage, values in sorted(per_stage.items()):
        found[f"stage_{stage}"] = day_stats(values)
    return found


def loss_reasons(start: datetime, end: datetime) -> dict[tuple[str, str], tuple[int, str]]:
    found: dict[tuple[str, str], list[Decimal]] = defaultdict(list)
    for d in deals_at(NOW).values():
        if d.status == "lost" and start <= d.lost_at < end:  # type: ignore[operator]
            found[("reason", str(d.reason))].append(d.amount)
            found[("stage", str(d.lost_stage))].append(d.amount)
    return {k: (len(v), cents(sum(v))) for k, v in found.items()}


def fresh(when: datetime) -> dict[str, Any]:
    first = date(when.year, when.month, 1)
    created_from = datetime(first.year + (first.month - 3) // 12, (first.month - 3) % 12 + 1, 1,
                            tzinfo=UTC)  # fmt: skip
    after_next = date(first.year + (first.month + 1) // 12, (first.month + 1) % 12 + 1, 1)
    close_by = after_next - timedelta(days=1)
    cohort = [d for d in deals_at(when).values() if created_from <= d.opened_at <= when
              and d.expected_close is not None and d.expected_close <= close_by]  # fmt: skip
    still = [d for d in cohort if d.status == "open"]
    won = [d for d in cohort if d.status == "won"]
    return {
        "fresh_count": len(still), "fresh_amount": cents(sum(d.amount for d in still)),
        "cohort_count": len(cohort), "won_count": len(won),
        "cohort_amount": cents(sum(d.amount for d in cohort)),
        "won_amount": cents(sum(d.amount for d in won)),
        "conversion_count_rate": ratio(len(won), len(cohort)),
        "conversion_amount_rate": ratio(sum(d.amount for d in won), sum(d.amount for d in cohort)),
    }  # fmt: skip


def attainment(month: int) -> str | None:
    """Payments in `month` on the deals won in the month before, over their contract amounts."""
    deals = deals_at(datetime(2026, month + 1, 1, tzinfo=UTC) - timedelta(microseconds=1))
    won = [d for d in deals.values() if d.status == "won" and d.won_at.month == month - 1]  # type: ignore[union-attr]
    paid = sum(a for d in won for t, a in d.payments if t.month == month)
    return ratio(paid, sum(d.won_amount or 0 for d in won))


def commissions(when: datetime) -> list[tuple[str, str]]:
    deals = deals_at(when)
    found = []
    for partner, name, day, days in REGISTRATIONS:
        d = deals.get(name)
        registered = at(day, 9)
        if d and d.status == "won" and registered <= d.won_at < registered + timedelta(days=days):  # type: ignore[operator]
            found.append((partner, name))
    return found
