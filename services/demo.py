"""`dealstream demo`: a year of a living sales organisation, loaded into a running system through
its real paths with a controlled clock — signed partner messages judged by capture's intake and
web-form leads by its web intake (deduped, registered), opened by the running pipeline service,
then moved by pipeline's commands week after week (stages, follow-ups, moves back, wins with
payments, losses, reopenings, reassignments), idle deals recycled, and notify's reminders,
escalations and digests ticked through the year. Seeded: the same data every time."""

from __future__ import annotations

import asyncio
import functools
import json
import random
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from psycopg.sql import SQL

from services.capture.app import MIGRATIONS as CAPTURE_MIGRATIONS
from services.capture.app import CaptureApp
from services.capture.domain import Incoming, partner_lead_id, sign
from services.capture.partners import PartnerExists, add_partner
from services.notify.app import Notifier
from services.notify.timers import MIGRATIONS as NOTIFY_MIGRATIONS
from services.pipeline.app import MIGRATIONS as PIPELINE_MIGRATIONS
from services.pipeline.app import PipelineApp, StaleVersion
from services.pipeline.domain import Opportunity, Refused
from shared.bus.kafka import make_producer
from shared.clock import FixedClock, SystemClock, utc_iso
from shared.contracts.common import Money
from shared.contracts.partner import WebFormLead
from shared.contracts.topics import PARTNER_LEADS
from shared.runtime import open_schema
from shared.settings import Settings

PARTNERS = ("acme", "bolt", "cathay")
DIRECTORY_TOML = (
    """# Written by `dealstream demo`: four teams across regions, their reps and managers.
[routing]
load_cap = 60
default_team = "east"
[[routing.rules]]
team = "east"
region = "CN-SH"
[[routing.rules]]
team = "north"
region = "CN-BJ"
[[routing.rules]]
team = "south"
region = "CN-GD"
[[routing.rules]]
team = "europe"
region = "DE-BE"
"""
    + "".join(
        f"""
[[directory.teams]]
id = "{team}"
name = "{name}"
manager = "{team}.mgr"
branch_manager = "{branch}"
timezone = "{zone}"
"""
        for team, name, branch, zone in (
            ("east", "East China", "vp.china", "Asia/Shanghai"),
            ("north", "North China", "vp.china", "Asia/Shanghai"),
            ("south", "South China", "vp.china", "Asia/Shanghai"),
            ("europe", "Europe", "vp.europe", "Europe/Berlin"),
        )
    )
    + "".join(
        f"""
[[directory.users]]
id = "{user}"
team = "{team}"
role = "{role}"
email = "{user}@demo.dealstream.dev"
locale = "{"en" if team == "europe" else "zh-CN"}"
timezone = "{"Europe/Berlin" if team == "europe" else "Asia/Shanghai"}"
"""
        for team in ("east", "north", "south", "europe")
        for user, role in [(f"{team}.mgr", "manager")]
        + [(f"{team}.rep{n}", "rep") for n in (1, 2, 3)]
    )
    + "".join(
        f"""
[[directory.users]]
id = "{user}"
role = "branch_manager"
email = "{user}@demo.dealstream.dev"
"""
        for user in ("vp.china", "vp.europe")
    )
)
REGIONS = ("CN-SH", "CN-BJ", "CN-GD", "DE-BE")
INDUSTRIES = ("logistics", "retail", "manufacturing", "finance", "healthcare")
COMPANIES = ("Huaxin", "Jinlong", "Tianyu", "Baihe", "Ruifeng", "Kaida", "Zhongtai", "Mingde",
             "Xinghe", "Yuanfang", "Nordlicht", "Spree", "Havel", "Lindner", "Brandt")  # fmt: skip
REASONS = ("price", "competitor", "no_budget", "no_decision", "timing", "product_fit",
           "unresponsive")  # fmt: skip


@dataclass
class Plan:
    """What will happen to one lead's opportunity: (when, action, argument) in time order."""

    lead_id: uuid.UUID | None
    captured_at: datetime
    steps: list[tuple[datetime, str, Any]]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def lead_body(rng: random.Random, company: str, region: str) -> dict[str, Any]:
    amount = rng.choice((12000, 18000, 35000, 48000, 90000, 150000, 260000, 480000))
    person = rng.choice(("Li", "Wang", "Zhang", "Liu", "Chen", "Müller", "Schmidt"))
    return {
        "company": {"name": company, "region": region, "industry": rng.choice(INDUSTRIES)},
        "contact": {"name": f"{person} {rng.randint(1, 99)}",
                    "email": f"buyer{rng.randrange(10**9)}@{company.split()[0].lower()}.example",
                    "phone": f"+86 139 {rng.randrange(10**8):08d}"},
        "need": rng.choice(("dedicated lines", "SD-WAN for branches", "cloud backup", "IoT fleet")),
        "budget": {"amount": f"{amount}.00", "currency": "CNY"},
        "authority": rng.choice(("decision_maker", "decision_maker", "influencer")),
        "timeline": rng.choice(("this_month", "this_quarter", "this_year")),
    }  # fmt: skip


def fate(rng: random.Random, opened: datetime, end: datetime) -> list[tuple[datetime, str, Any]]:
    """A plausible life: forward through the stages with follow-ups, sometimes back a stage,
    then won (and paid), lost (sometimes reopened), or still open."""
    steps: list[tuple[datetime, str, Any]] = []
    t = opened
    stage = "A"
    target = rng.choice("ABBCCDDEEE")
    while stage < target:
        for _ in range(rng.randint(0, 2)):
            t += timedelta(days=rng.randint(1, 6), hours=rng.randint(0, 8))
            steps.append((t, "follow_up", rng.choice(("call", "visit", "wechat", "meeting"))))
        t += timedelta(days=rng.randint(2, 12))
        if stage == "C":
            steps.append((t, "proposal", None))
        nxt = "ABCDEF"["ABCDEF".index(stage) + 1]
        steps.append((t, "stage", nxt))
        stage = nxt
        if stage in "CD" and rng.random() < 0.1:
            t += timedelta(days=rng.randint(1, 5))
            back = "ABCDEF"["ABCDEF".index(stage) - 1]
            steps.append((t, "back", back))
            t += timedelta(days=rng.randint(3, 9))
            steps.append((t, "stage", stage))
    if rng.random() < 0.08:
        t += timedelta(days=rng.randint(1, 10))
        steps.append((t, "reassign", None))
    roll = rng.random()
    t += timedelta(days=rng.randint(3, 20))
    if stage == "E" and roll < 0.75:
        steps.append((t, "win", None))
        steps.append((t + timedelta(days=rng.randint(10, 45)), "pay", 0.4))
        steps.append((t + timedelta(days=rng.randint(50, 90)), "pay", 0.6))
    elif roll < 0.55:
        steps.append((t, "lose", rng.choice(REASONS)))
        if rng.random() < 0.15:
            t += timedelta(days=rng.randint(5, 30))
            steps.append((t, "reopen", None))
            if rng.random() < 0.5:
                steps.append((t + timedelta(days=rng.randint(5, 20)), "lose", "competitor"))
    return [s for s in steps if s[0] < end]


async def demo(
    settings: Settings, weeks: int = 52, per_week: int = 12, seed: int = 2026
) -> dict[str, int]:
    rng = random.Random(seed)
    config = settings.config_file
    if not config.exists():
        config.write_text(DIRECTORY_TOML, encoding="utf-8")
        say(f"wrote {config} (teams, reps, managers, routing by region)")
    rules = settings.rules()
    end = SystemClock().now().replace(microsecond=0)  # the year ends now
    start = end - timedelta(weeks=weeks)
    capture_pool = await open_schema(settings, "capture", CAPTURE_MIGRATIONS)
    secrets = {}
    for partner in PARTNERS:
        try:
            secrets[partner] = await add_partner(capture_pool, partner)
        except PartnerExists:
            row = await capture_pool.fetchrow("SELECT secret FROM partners WHERE partner_id = $1",
                                              partner)  # fmt: skip
            secrets[partner] = row["secret"]
    await capture_pool.close()
    await (await open_schema(settings, "pipeline", PIPELINE_MIGRATIONS)).close()
    capture = await asyncio.to_thread(CaptureApp, settings.dsn(), "capture", 2)
    pipeline = await asyncio.to_thread(PipelineApp, settings.dsn(), "pipeline", 2)
    try:
        plans = await asyncio.to_thread(_capture_leads, capture, rng, secrets, start, end, weeks,
                                        per_week, rules)  # fmt: skip
        # A partner's lead for a company another partner holds is answered `conflict`, and
        # not stored: only stored leads become (or join) opportunities.
        stored = await asyncio.to_thread(capture.existing_ids, [p.lead_id for p in plans])
        refused = len(plans) - len(stored)
        plans = [p for p in plans if p.lead_id in stored]
        say(f"captured {len(plans)} leads over {weeks} weeks through capture's intake"
            f" ({refused} partner submissions answered `conflict`)")  # fmt: skip
        opened = await _wait_opened(pipeline, plans)
        say(f"pipeline opened {len(opened)} opportunities")
        done = await asyncio.to_thread(_drive, pipeline, plans, opened, rng, rules)
        recycled = await asyncio.to_thread(pipeline.recycle_idle, end, rules, 10_000)
        say(f"{done} pipeline commands applied; {len(recycled)} idle opportunities recycled")
    finally:
        capture.close()
        pipeline.close()
    notified = await _tick_notify(settings, start, end)
    return {"leads": len(plans), "opportunities": len(opened), "commands": done,
            "recycled": len(recycled), "notifications": notified}  # fmt: skip


def _capture_leads(
    capture: CaptureApp, rng: random.Random, secrets: dict[str, str], start: datetime,
    end: datetime, weeks: int, per_week: int, rules: Any,
) -> list[Plan]:  # fmt: skip
    plans: list[Plan] = []
    offset = int(capture.tracked_position("demo:partner.leads"))
    for week in range(weeks):
        monday = start + timedelta(weeks=week)
        batch: list[Incoming] = []
        for _ in range(per_week):
            at = monday + timedelta(hours=rng.randint(1, 24 * 7 - 1))
            region = rng.choice(REGIONS)
            company = f"{rng.choice(COMPANIES)} {rng.choice(('Tech', 'Trading', 'Group', 'GmbH'))}"
            if rng.random() < 0.35:  # a web form
                form = WebFormLead.model_validate(lead_body(rng, company, region))
                lead_id = capture.capture_web_lead(form, at, f"demo-web-{uuid.uuid4().hex[:8]}")
                plans.append(Plan(lead_id, at, fate(rng, at, end)))
                continue
            partner = rng.choice(PARTNERS)
            message_id = f"demo-{uuid.uuid4().hex[:12]}"
            body = {"message_id": message_id, "partner_id": partner,
                    "submitted_at": utc_iso(at),
                    **lead_body(rng, company, region)}  # fmt: skip
            value = json.dumps(body).encode()
            offset += 1
            batch.append(Incoming(
                topic=PARTNER_LEADS, partition=0, offset=offset - 1, key=partner.encode(),
                value=value, headers={"x-partner-id": partner, "x-message-id": message_id,
                                      "x-signature": sign(secrets[partner], value)},
            ))  # fmt: skip
            plans.append(Plan(None, at, fate(rng, at, end)))
            plans[-1].steps.insert(0, (at, "partner", (partner, message_id)))
        if batch:
            capture.handle_partner_messages(
                "demo:partner.leads", batch, {p: [s] for p, s in secrets.items()},
                monday + timedelta(days=7), rules,
            )  # fmt: skip
    for plan in plans:
        if plan.lead_id is None:
            partner, message_id = plan.steps.pop(0)[2]
            plan.lead_id = partner_lead_id(partner, message_id)
    return plans


async def _wait_opened(
    pipeline: PipelineApp, plans: list[Plan], within: float = 300
) -> dict[uuid.UUID, uuid.UUID]:
    """lead id → opportunity id, once the running pipeline service has opened every captured
    lead (or attached it, deduped, to the opportunity of the customer it matched)."""
    leads = [p.lead_id for p in plans]
    statement = SQL(
        "SELECT lead_id, opportunity_id FROM {} WHERE lead_id = ANY(%b::uuid[])"
    ).format(pipeline.table("opportunity_lead"))
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        rows = await asyncio.to_thread(pipeline.query, statement, [leads])
        if len(rows) == len(leads):
            return {r["lead_id"]: r["opportunity_id"] for r in rows}
        await asyncio.sleep(1)
    raise RuntimeError(
        f"pipeline opened {len(rows)} of {len(leads)} demo leads in {within:.0f}s:"
        " is `dealstream dev` (or the pipeline service) running?"
    )


def _drive(pipeline: PipelineApp, plans: list[Plan], opened: dict[uuid.UUID, uuid.UUID],
           rng: random.Random, rules: Any) -> int:  # fmt: skip
    agenda = sorted(
        ((when, opened[p.lead_id], action, arg) for p in plans if p.lead_id in opened
         for when, action, arg in p.steps),
        key=lambda step: step[0],
    )  # fmt: skip
    owners = [u.id for u in rules.directory.users if u.role == "rep"]
    done = 0
    for when, opportunity_id, action, arg in agenda:
        change = _change(action, arg, when, rules, owners, rng)
        if change is None:
            continue
        try:
            current = pipeline.get(opportunity_id)
            act = functools.partial(change, who=current.owner or "demo")
            pipeline.command(opportunity_id, current.version, act, correlation_id=f"demo:{action}")
            done += 1
        except (Refused, StaleVersion):
            continue  # a merged lead's plan meeting another's, say: life goes on
    return done


def _change(action: str, arg: Any, when: datetime, rules: Any, owners: list[str],
            rng: random.Random) -> Callable[[Opportunity, str], None] | None:  # fmt: skip
    def money(o: Opportunity, share: float = 1.0) -> Money:
        base = (o.contract_amount or o.proposal_amount or o.amount or
                Money(amount="20000.00", currency="CNY"))  # fmt: skip
        return Money(amount=f"{base.amount * Decimal(str(share)):.2f}", currency=base.currency)

    if action == "follow_up":
        return lambda o, who: o.log_follow_up(arg, "checked in", who, when,
                                              authority="decision_maker")  # fmt: skip
    if action == "proposal":
        return lambda o, who: o.change_amount("proposal", money(o, 0.95), who, when, rules)
    if action == "stage":
        return lambda o, who: o.change_stage(arg, who, when, rules)
    if action == "back":
        return lambda o, who: o.change_stage(arg, who, when, rules, note="needs another round")
    if action == "win":
        return lambda o, who: o.win(money(o), who, when, rules)
    if action == "pay":
        return lambda o, who: o.receive_payment(money(o, arg), "finance", when)
    if action == "lose":
        rival = "Rival Co" if arg == "competitor" else None
        return lambda o, who: o.lose(arg, who, when, rules, note="demo", competitor=rival)
    if action == "reopen":
        return lambda o, who: o.reopen(who, when, rules, note="customer came back")
    if action == "reassign":
        owner = rng.choice(owners)
        team = next((u.team for u in rules.directory.users if u.id == owner), None)
        return lambda o, who: o.assign(owner, team, "demo.manager", when)
    return None


async def _tick_notify(settings: Settings, start: datetime, end: datetime) -> int:
    """Run notify's due work week by week through the year, once notify has read every event."""
    pool = await open_schema(settings, "notify", NOTIFY_MIGRATIONS)
    pipeline_pool = await open_schema(settings, "pipeline", PIPELINE_MIGRATIONS)
    try:
        total = await pipeline_pool.fetchval("SELECT count(*) FROM pipeline_events")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            applied = await pool.fetchval("SELECT coalesce(sum(version), 0) FROM stream_position")
            if applied >= total:
                break
            await asyncio.sleep(1)
        producer = make_producer(settings, linger_ms=10)
        await producer.start()
        issued = 0
        try:
            notifier = Notifier(pool, settings, producer, "demo")
            at = start
            while at <= end:
                issued += (await notifier.tick(FixedClock(at)))["notifications"]
                at += timedelta(days=1)
        finally:
            await producer.stop()
        say(f"notify issued {issued} reminders, escalations, warnings and digests")
        return issued
    finally:
        await pool.close()
        await pipeline_pool.close()


def main(settings: Settings, weeks: int, per_week: int) -> int:
    done = asyncio.run(demo(settings, weeks, per_week))
    print(json.dumps(done))
    return 0
