"""One chaos run: the load and the faults for `seconds`, then the drain (bounded waits that name
what is stuck), then the counts of tests.chaos, printed. The stack and the services are the
caller's (`python -m tests.chaos` starts its own; the e2e test takes the fixtures')."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from shared.devstack import DevStack
from tests.chaos.bus import Follower, StreamWatch, follow_until
from tests.chaos.checks import (
    NotificationWatch,
    Stores,
    bus_counts,
    command_counts,
    opportunity_counts,
    read_stores,
    reminder_records,
    verify_reporting,
)
from tests.chaos.faults import Faults
from tests.chaos.partner import Partner
from tests.chaos.sales import AHEAD, StageMover, Ticker, notify_tick
from tests.e2e.conftest import Services, cli, partner_secret
from tests.support import connected, eventually

PARTNER = "chaosco"


@dataclass
class Plan:
    seconds: float = 90.0
    seed: int = 8
    rate: float = 150.0  # partner messages a second
    every: float = 10.0  # seconds between kills
    patience: float = 15.0  # seconds the partner waits for an answer before sending again
    drain_within: float = 180.0  # seconds each wait of the drain may take
    wait_for_leases: bool = True  # wait out deliveries a killed notify holds (2 min lease)


@dataclass
class Report:
    plan: Plan
    how: str = ""  # the faults, in a few words
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # must all be zero
    seen: dict[str, Any] = field(default_factory=dict)  # what happened, for the reader
    totals: dict[str, int] = field(default_factory=dict)  # the same, as numbers for tests
    stuck: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    took: dict[str, float] = field(default_factory=dict)

    @property
    def problems(self) -> dict[str, int]:
        found = {f"{group}: {name}": n for group, counts in self.counts.items()
                 for name, n in counts.items() if n}  # fmt: skip
        found.update({f"stuck: {what}": 1 for what in self.stuck})
        return found

    def print(self) -> None:
        p = self.plan
        print(f"\nchaos: {p.seconds:.0f}s of load at {p.rate:.0f} msg/s, seed {p.seed}, {self.how}")
        print("faults:")
        for fault in self.faults:
            print(f"  {fault}")
        print("what happened:")
        for name, value in self.seen.items():
            print(f"  {name:.<62} {value}")
        for group, counts in self.counts.items():
            print(f"{group} (each must be 0):")
            for name, n in counts.items():
                print(f"  {name:.<62} {n}{'' if n == 0 else '   <-- FAIL'}")
        for what in self.stuck:
            print(f"stuck: {what}")
        print("took: " + ", ".join(f"{k} {v:.0f}s" for k, v in self.took.items()))
        problems = self.problems
        verdict = f"FAILED: {len(problems)} non-zero counts" if problems else "OK"
        print(f"result: {verdict}", flush=True)


async def run_chaos(
    stack: DevStack, services: Services, plan: Plan, kind: type[Faults] = Faults
) -> Report:
    """The run, with the faults of `kind`: `Faults` (kills, a fresh broker, a PostgreSQL crash)
    or `Rebalances` (replicas added and killed: tests/e2e/test_scale_out.py)."""
    report = Report(plan)
    began = time.monotonic()
    rng = random.Random(plan.seed)
    env = services.env
    out = await asyncio.to_thread(cli, env, "partner", "add", PARTNER)
    secret = partner_secret(out)
    partner = Partner(stack.kafka, PARTNER, secret, rng, plan.rate, patience=plan.patience)
    await partner.start()
    mover = StageMover(services.url("pipeline"), env["DEALSTREAM_TOKEN_SECRET"], rng,
                       lambda: list(partner.accepted_leads().values()))  # fmt: skip
    ticker = Ticker(env)
    faults = kind(stack, services, random.Random(plan.seed + 1), plan.seconds, plan.every)
    report.how = faults.describe()
    live = StreamWatch()
    subscriber = Follower(stack.kafka, "opportunity.events.v1", live.take)
    stop_load, stop_all = asyncio.Event(), asyncio.Event()
    background = [asyncio.create_task(t) for t in (
        partner.follower.run(stop_all), subscriber.run(stop_all),
        partner.resend_unanswered(stop_all),
    )]  # fmt: skip
    load = [asyncio.create_task(t) for t in (
        partner.load(stop_load), mover.run(stop_load), ticker.run(stop_load), faults.run(stop_load)
    )]  # fmt: skip
    print(f"chaos: load for {plan.seconds:.0f}s; faults as they happen:", flush=True)
    try:
        await asyncio.sleep(plan.seconds)
        stop_load.set()
        await asyncio.gather(*load)
        report.took["load"] = time.monotonic() - began
        drained = time.monotonic()
        stores = await drain(stack, services, plan, partner, faults, live, report)
        last_tick = await final_ticks(stack, env, plan, report)
        report.took["drain"] = time.monotonic() - drained
    finally:
        stop_all.set()
        ended = await asyncio.gather(*background, return_exceptions=True)
        for task, outcome in zip(("the partner's reply follower", "the live subscriber",
                                  "the re-sender"), ended, strict=True):  # fmt: skip
            if isinstance(outcome, BaseException):
                report.stuck.append(f"{task} ended early: {outcome!r}")
        await partner.stop()
    checked = time.monotonic()
    fresh = StreamWatch()
    await follow_until(stack.kafka, "opportunity.events.v1", fresh.take,
                       lambda: stores.behind(fresh.applied) == 0, plan.drain_within)  # fmt: skip
    notifications = NotificationWatch()
    heard = idle(lambda: len(notifications.seen) + notifications.copies)
    await follow_until(stack.kafka, "notification.events.v1", notifications.take, heard, 60)
    code, differences, failure = await asyncio.to_thread(verify_reporting, env)
    async with connected(stack.database_url) as db:
        reminders = await reminder_records(db, last_tick)
    report.took["checks"] = time.monotonic() - checked
    report.faults = [f"t={f.at:5.1f}s  {f.what} ({f.took:.1f}s)" for f in faults.happened]
    accepted = partner.accepted_leads()
    report.seen = {
        "SIGKILLs / broker replaced / PostgreSQL crashed": f"{faults.kills} / "
        f"{faults.count('broker')} / {faults.count('PostgreSQL')}",
        "partner messages (distinct message ids)": len(partner.messages),
        "sends (replays on purpose / re-sent unanswered)": f"{partner.sends} ("
        f"{sum(m.replays for m in partner.messages.values())} / "
        f"{sum(m.resends for m in partner.messages.values())})",
        "producer errors (the broker away)": partner.producer_errors,
        "answers / copies of answers on the bus": f"{sum(map(len, partner.answers.values()))}"
        f" / {partner.reply_copies}",
        "accepted leads / opportunities": f"{len(accepted)} / {len(stores.opportunities)}",
        "opportunity events / copies seen by the live subscriber": f"{len(live.event_ids)}"
        f" / {live.copies}",
        "fresh reader of the final broker: versions met ahead": len(fresh.gaps),
        "stuck subscriber clients started over (live, replies)": f"{subscriber.stalls}, "
        f"{partner.follower.stalls}",
        "stage changes acknowledged (no answer / refused)": f"{len(mover.acknowledged)} "
        f"({mover.unanswered} / {mover.stale})",
        "notify ticks during the load (failed)": f"{len(ticker.done)} ({ticker.failed})",
        "reminders issued / deliveries sent": f"{reminders['issued']} / {reminders['sent']}",
        "reminders on the final broker / copies": f"{len(notifications.seen)}"
        f" / {notifications.copies}",
        "deliveries pending (leased by a killed notify)": f"{reminders['pending']} "
        f"({reminders['pending, leased by a killed notify']})",
    }
    report.totals = {
        "kills": faults.kills,
        "broker restarts": faults.count("broker"),
        "postgres restarts": faults.count("PostgreSQL"),
        "messages": len(partner.messages),
        "accepted": len(accepted),
        "opportunities": len(stores.opportunities),
        "stage changes": len(mover.acknowledged),
        "reminders sent": reminders["sent"],
    }
    replies = partner.reply_counts(faults.fresh_broker_at)
    report.seen["sends without an answer of their own (lost with the old broker)"] = replies.pop(
        "sends without an answer of their own"
    )
    report.counts = {
        "partner replies": replies,
        "opportunities": opportunity_counts(stores, accepted),
        "opportunity.events.v1": bus_counts(stores, live, fresh),
        "stage changes": {
            "acknowledged but not on the bus": command_counts(mover.acknowledged, fresh)
        },
        "reporting": {
            "replay --verify differences": len(differences),
            "replay --verify failed to run": int(bool(failure) or code not in (0, 1)),
        },
        "reminders": {
            "issued twice (notify's records)": reminders["issued twice"],
            "sent twice (a delivery with two successful attempts)": reminders[
                "sent by two attempts"
            ],
            "sent twice on the bus (two notifications, one reminder)": notifications.twice(),
            "due at the last tick and not issued": reminders["due and not fired"],
            "deliveries still pending": reminders["pending"] if plan.wait_for_leases else 0,
        },
    }
    if failure:
        report.stuck.append(f"replay reporting --verify: {failure}")
    report.took["total"] = time.monotonic() - began
    report.print()
    return report


async def drain(stack: DevStack, services: Services, plan: Plan, partner: Partner,
                faults: Faults, live: StreamWatch, report: Report) -> Stores:  # fmt: skip
    """Wait (each wait bounded) until every service is ready, every message is answered, and
    pipeline, notify, reporting and the live subscriber hold every opportunity's events."""
    try:
        await asyncio.to_thread(services.wait_ready, within=plan.drain_within)
    except AssertionError as exc:
        report.stuck.append(str(exc))

    def waiting() -> int:
        """Messages without an answer, and sends to the final broker without theirs."""
        fresh = faults.fresh_broker_at or float("inf")
        return sum(
            1
            for m, sent in partner.messages.items()
            if m not in partner.answers
            or (sent.sends[0] > fresh and len(partner.answers[m]) < len(sent.sends))
        )

    if (left := await eventually(waiting, lambda n: n == 0, plan.drain_within, 1.0)) != 0:
        report.stuck.append(f"{left} partner messages unanswered after {plan.drain_within:.0f}s; "
                            f"capture: {await readiness(services, 'capture')}")  # fmt: skip
    async with connected(stack.database_url) as db:
        accepted = {str(lead) for lead in partner.accepted_leads().values()}

        async def state() -> Stores:
            return await read_stores(db)

        def caught_up(s: Stores) -> bool:
            return (accepted <= set(s.leads) and s.behind(s.notify) == 0
                    and s.behind(s.reporting) == 0 and s.behind(live.applied) == 0)  # fmt: skip

        stores = await eventually(state, caught_up, plan.drain_within, 1.0)
        if not caught_up(stores):
            report.stuck.append(
                f"after {plan.drain_within:.0f}s: {len(accepted - set(stores.leads))} accepted"
                f" leads without an opportunity (pipeline: {await readiness(services, 'pipeline')})"
                f", versions behind: notify {stores.behind(stores.notify)}, reporting "
                f"{stores.behind(stores.reporting)}, the live subscriber "
                f"{stores.behind(live.applied)}"
            )
    return stores


async def final_ticks(stack: DevStack, env: dict[str, str], plan: Plan,
                      report: Report) -> datetime:  # fmt: skip
    """Tick notify until every delivery is out (a killed notify's lease runs out after 2
    minutes) or, without `wait_for_leases`, once; the `now` of the last tick."""
    last = [datetime.now(UTC) + AHEAD]
    if await notify_tick(env, last[0]) is None:
        report.stuck.append("the final notify tick failed")
    report.seen["final notify ticks"] = 1
    if not plan.wait_for_leases:
        return last[0]
    async with connected(stack.database_url) as db:

        async def pending() -> int:
            left = int(await db.fetchval(
                "SELECT count(*) FROM notify.delivery WHERE status = 'pending'"))  # fmt: skip
            if left:
                last[0] = datetime.now(UTC) + AHEAD
                await notify_tick(env, last[0])
                report.seen["final notify ticks"] += 1
            return left

        left = await eventually(pending, lambda n: n == 0, plan.drain_within, 5.0)
        if left:
            report.stuck.append(f"{left} notify deliveries still pending")
    return last[0]


def idle(count: Any, quiet: float = 2.0) -> Any:
    """A `done` for follow_until: true once `count()` has not moved for `quiet` seconds."""
    last = [-1, time.monotonic()]

    def done() -> bool:
        now, n = time.monotonic(), count()
        if n != last[0]:
            last[:] = [n, now]
        return n > 0 and now - last[1] > quiet

    return done


async def readiness(services: Services, service: str) -> str:
    try:
        async with httpx.AsyncClient(timeout=3) as http:
            return (await http.get(f"{services.url(service)}/readyz")).text[:400]
    except httpx.HTTPError as exc:
        return f"not answering ({type(exc).__name__})"
