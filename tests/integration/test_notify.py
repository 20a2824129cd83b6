"""Notify (SPEC §5) with time under control: reminders at the due time, escalation two days
later, nothing after a follow-up; major deals to the branch manager at once; Monday digests in
the team's zone; real SMTP and webhook deliveries; replays that send nothing new."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from services.notify.api import create_api
from services.notify.domain import recipient
from services.notify.firing import DIGEST_LINES, Channels, draft, store
from services.notify.timers import timer_projector
from shared.auth import Principal, Role, issue_token
from shared.bus.consumer import apply_read_model
from shared.clock import utc_iso
from shared.contracts.topics import DEAD_LETTER, NOTIFICATION_EVENTS
from shared.devstack import DevStack
from tests.integration.notify_fixtures import NotifyRig, rig, smtp, webhook  # noqa: F401
from tests.notify_support import Deal
from tests.support import eventually, read_topic

T = datetime(2026, 11, 16, 2, 0, tzinfo=UTC)
DAY = timedelta(days=1)
MINUTE = timedelta(minutes=1)


def kinds(notifications: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    return [(n["kind"], n["recipient"]) for n in notifications]


async def test_a_slipping_follow_up_is_reminded_then_escalated_and_a_follow_up_stops_it(
    rig: NotifyRig,  # noqa: F811
    smtp: Any,  # noqa: F811
) -> None:
    port, mailbox = smtp
    mailing = rig.settings.model_copy(update={"smtp_host": "127.0.0.1", "smtp_port": port})
    deal = Deal(T)
    await rig.feed(deal.take())

    assert (await rig.tick(T + 3 * DAY - MINUTE, mailing))["notifications"] == 0
    done = await rig.tick(T + 3 * DAY, mailing)
    assert done["notifications"] == 1 and done["sent"] == 2  # the bus and e-mail
    [reminder] = await rig.notifications()
    assert (reminder["kind"], reminder["recipient"], reminder["locale"]) == (
        "follow_up_due", "rep.wang", "zh-CN"
    )  # fmt: skip
    assert reminder["derived_from"] == [str(deal.log[0].event_id)]  # the opening started it
    assert reminder["link"].endswith(f"/v1/opportunities/{deal.id}")
    [mail] = mailbox.messages
    assert mail["To"] == "wang@example.cn" and "跟进到期" in mail["Subject"]
    assert mail["Message-ID"] == f"<{reminder['notification_id']}@dealstream>"
    assert str(deal.id) in mail.get_content()

    assert (await rig.tick(T + 3 * DAY + MINUTE, mailing))["notifications"] == 0  # once
    assert (await rig.tick(T + 5 * DAY - MINUTE, mailing))["notifications"] == 0
    await rig.tick(T + 5 * DAY, mailing)
    escalation = (await rig.notifications("escalation"))[0]
    assert (escalation["recipient"], escalation["overdue_days"]) == ("mgr.zhao", 2)
    assert escalation["chain"] == ["rep.wang", "mgr.zhao", "vp.sun"]
    assert escalation["after"]["escalated_to"] == "mgr.zhao"
    assert mailbox.envelopes[-1][1] == ["zhao@example.cn"]

    deal.o.log_follow_up("call", "called back", "rep.wang", T + 5 * DAY + MINUTE)
    await rig.feed(deal.take())
    for later in (6, 7, 8):  # the old clock's timers are gone; the new one is due at +8d 1min
        await rig.tick(T + later * DAY, mailing)
    # Only the Monday digests (T + 7d is a Monday morning) came after the follow-up.
    assert [k for k in kinds(await rig.notifications()) if k[0] != "weekly_digest"] == [
        ("follow_up_due", "rep.wang"),
        ("escalation", "mgr.zhao"),
    ]

    # The bus carries each notification as a NotificationIssued envelope.
    ids = {n["notification_id"] for n in await rig.notifications() if n["opportunity_id"]}
    records = await read_topic(
        rig.settings.bootstrap_servers(),
        NOTIFICATION_EVENTS,
        lambda rs: ids <= {json.loads(r.value)["event_id"] for r in rs},
    )
    mine = [json.loads(r.value) for r in records if json.loads(r.value)["event_id"] in ids]
    assert len(mine) == len(ids) == 2
    for envelope in mine:
        assert envelope["event_type"] == "NotificationIssued" and envelope["stream_version"] == 1
        assert envelope["data"]["opportunity_id"] == str(deal.id)
        assert envelope["causation_id"] == envelope["data"]["derived_from"][0]


async def test_a_major_deal_goes_to_the_branch_manager_at_once(rig: NotifyRig) -> None:  # noqa: F811
    deal = Deal(T, amount="500000.00")
    await rig.feed(deal.take())
    await rig.tick(T + 3 * DAY)
    assert sorted(kinds(await rig.notifications())) == [
        ("escalation", "vp.sun"),
        ("follow_up_due", "rep.wang"),
    ]
    [escalation] = await rig.notifications("escalation")
    assert escalation["recipient_role"] == "branch_manager" and escalation["overdue_days"] == 0


async def test_stale_expected_close_and_recycling_notices(rig: NotifyRig) -> None:  # noqa: F811
    deal = Deal(T, expected_close="2026-11-20")
    await rig.feed(deal.take())
    await rig.tick(datetime(2026, 11, 20, 16, 0, tzinfo=UTC))  # Nov 21 00:00 in Shanghai
    assert ("expected_close_passed", "rep.wang") in kinds(await rig.notifications())
    [closing] = await rig.notifications("expected_close_passed")  # its own moment, not the
    assert (closing["due_at"], closing["overdue_days"]) == (
        "2026-11-20T16:00:00Z",
        0,
    )  # follow-up's
    await rig.tick(T + 30 * DAY)
    stale = await rig.notifications("stale_warning")
    assert sorted(n["recipient"] for n in stale) == ["mgr.zhao", "rep.wang"]
    assert {(n["due_at"], n["overdue_days"]) for n in stale} == {(utc_iso(T + 30 * DAY), 0)}
    deal.o.recycle(T + 60 * DAY, rig.rules)
    await rig.feed(deal.take())
    await rig.tick(T + 60 * DAY)
    [notice] = await rig.notifications("recycled")
    assert notice["recipient"] == "mgr.zhao" and notice["after"]["owner"] is None
    assert notice["derived_from"] == [str(deal.log[-1].event_id)]


async def test_the_monday_digest_lists_exactly_the_teams_overdue_and_quiet_deals_across_dst(
    rig: NotifyRig,  # noqa: F811
) -> None:
    # Berlin switched to summer time on Sunday 2026-03-29: Monday 09:00 is 07:00 UTC.
    berlin = {"owner": "rep.anna", "team": "berlin"}
    overdue = Deal(datetime(2026, 3, 25, 10, tzinfo=UTC), **berlin)
    fresh = Deal(datetime(2026, 3, 29, 10, tzinfo=UTC), **berlin)
    quiet = Deal(datetime(2026, 3, 10, 10, tzinfo=UTC), amount="100000.00", **berlin)
    busy = Deal(datetime(2026, 3, 10, 10, tzinfo=UTC), amount="100000.00", **berlin)
    busy.o.log_follow_up("visit", "demo", "rep.anna", datetime(2026, 3, 29, 12, tzinfo=UTC))
    elsewhere = Deal(datetime(2026, 3, 20, 10, tzinfo=UTC))  # team east
    for deal in (overdue, fresh, quiet, busy, elsewhere):
        await rig.feed(deal.take())

    await rig.tick(datetime(2026, 3, 30, 6, 59, tzinfo=UTC))
    assert not [n for n in await rig.notifications("weekly_digest") if n["team"] == "berlin"]
    await rig.tick(datetime(2026, 3, 30, 7, 0, tzinfo=UTC))
    await rig.tick(datetime(2026, 3, 30, 7, 30, tzinfo=UTC))
    [digest] = [n for n in await rig.notifications("weekly_digest") if n["team"] == "berlin"]
    assert (digest["recipient"], digest["locale"]) == ("mgr.karl", "en")
    lines = digest["lines"]
    late = {line["opportunity_id"] for line in lines if line["overdue_days"] is not None}
    still = {line["opportunity_id"] for line in lines if line["overdue_days"] is None}
    assert late == {str(overdue.id), str(quiet.id)}
    assert still == {str(quiet.id)}
    assert "Overdue follow-ups" in digest["body"] and "Weekly pipeline digest" in digest["subject"]
    assert digest["issued_at"] == "2026-03-30T07:00:00Z"
    [east] = [n for n in await rig.notifications("weekly_digest") if n["team"] == "east"]
    assert {line["opportunity_id"] for line in east["lines"]} == {str(elsewhere.id)}
    assert "漏跟进预警" in east["body"]


async def test_a_webhook_that_fails_twice_gets_one_delivery_in_three_attempts(
    rig: NotifyRig,  # noqa: F811
    webhook: Any,  # noqa: F811
) -> None:
    hook = await webhook(failures=2)
    hooked = rig.settings.model_copy(update={
        "webhook_url": f"http://127.0.0.1:{hook.port}/dealstream", "webhook_secret": "s3cret",
        "delivery_backoff_seconds": 0.01,
    })  # fmt: skip
    deal = Deal(T)
    await rig.feed(deal.take())
    await rig.tick(T + 3 * DAY, hooked)
    [reminder] = await rig.notifications()
    delivery = (await rig.deliveries(reminder["notification_id"]))["webhook"]
    assert (delivery["status"], delivery["attempts"]) == ("sent", 3)
    attempts = await rig.pool.fetch(
        "SELECT attempt, ok FROM delivery_attempt WHERE delivery_id = $1 ORDER BY attempt",
        delivery["id"],
    )
    assert [(a["attempt"], a["ok"]) for a in attempts] == [(1, False), (2, False), (3, True)]
    assert len(hook.requests) == 3
    for headers, body in hook.requests:
        expected = "sha256=" + hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
        assert headers["x-dealstream-signature"] == expected
        assert headers["x-dealstream-delivery"] == f"{reminder['notification_id']}:webhook"
        payload = json.loads(body)
        assert payload["before"]["follow_up"] == "due" and payload["after"]["stage"] == "A"
    await rig.tick(T + 3 * DAY + MINUTE, hooked)
    assert len(hook.requests) == 3  # sent is sent


async def test_a_webhook_that_never_answers_goes_to_the_dead_letter_topic(
    rig: NotifyRig,  # noqa: F811
    webhook: Any,  # noqa: F811
) -> None:
    hook = await webhook(failures=100)
    hooked = rig.settings.model_copy(update={
        "webhook_url": f"http://127.0.0.1:{hook.port}/x", "delivery_attempts": 3,
        "delivery_backoff_seconds": 0.01,
    })  # fmt: skip
    await rig.feed(Deal(T).take())
    await rig.tick(T + 3 * DAY, hooked)
    [reminder] = await rig.notifications()
    deliveries = await rig.deliveries(reminder["notification_id"])
    assert (deliveries["webhook"]["status"], deliveries["webhook"]["attempts"]) == ("dead", 3)
    assert deliveries["kafka"]["status"] == "sent"  # one channel's failure spares the others
    assert "500" in deliveries["webhook"]["last_error"]
    records = await read_topic(
        rig.settings.bootstrap_servers(),
        DEAD_LETTER,
        lambda rs: any(reminder["notification_id"].encode() in r.value for r in rs),
    )
    [letter] = [json.loads(r.value) for r in records
                if reminder["notification_id"].encode() in r.value]  # fmt: skip
    assert letter["kind"] == "notification_undeliverable" and letter["attempts"] == 3
    assert letter["notification"]["notification_id"] == reminder["notification_id"]


async def test_a_page_of_slow_webhooks_outlasting_its_lease_sends_each_once(
    rig: NotifyRig,  # noqa: F811
    webhook: Any,  # noqa: F811
) -> None:
    """A page's last deliveries wait their turn longer than the lease; another replica takes
    them over then. Each is sent by one of the two, never by both (they were sent twice)."""
    hook = await webhook(failures=0, delay=0.5)
    hooked = rig.settings.model_copy(update={
        "webhook_url": f"http://127.0.0.1:{hook.port}/x", "delivery_lease_seconds": 1.0,
    })  # fmt: skip
    for deal in [Deal(T) for _ in range(64)]:  # 64 webhooks, 16 at a time: 4 rounds of 0.5 s
        await rig.feed(deal.take())
    first = asyncio.create_task(rig.tick(T + 3 * DAY, hooked, "replica-1"))
    # As soon as the first replica's lease on its page's last deliveries is over (they wait
    # their turn: their round is not begun), however long it took to claim them.
    expired = await eventually(
        lambda: rig.pool.fetchval(
            "SELECT count(*) FROM delivery WHERE status = 'pending'"
            " AND claimed_by = 'replica-1' AND claimed_until < now()"
        ),
        lambda n: n > 0,
        every=0.02,
    )
    assert expired > 0
    second = await rig.tick(T + 3 * DAY + MINUTE, hooked, "replica-2")
    done = await first
    assert second["sent"] > 0 and done["sent"] > 0  # each replica sent some: one took over
    sent = [headers["x-dealstream-delivery"] for headers, _ in hook.requests]
    assert len(sent) == len(set(sent)) == 64
    rows = await rig.pool.fetch("SELECT status, attempts, claimed_by FROM delivery"
                                " WHERE channel = 'webhook'")  # fmt: skip
    assert [tuple(r) for r in rows] == [("sent", 1, None)] * 64


async def test_a_notification_too_large_for_the_bus_is_dead_lettered_and_spares_the_page(
    rig: NotifyRig,  # noqa: F811
) -> None:
    """The broker takes 1 MiB a message: a larger notification is refused at once. It goes to
    the dead-letter topic with its head, and the others of its page are sent and recorded (it
    stopped the whole page, which was then sent again at every tick)."""
    who = recipient("rep.wang", "owner", rig.rules)
    channels = Channels(email=False, webhook=None, public_url="http://dealstream.test")
    big, small = (
        draft(f"test:{name}", who, channels, kind="follow_up_due", subject=name, body=body,
              issued_at=T)
        for name, body in (("big", "长" * 400_000), ("small", "short"))
    )  # fmt: skip
    async with rig.pool.acquire() as conn:
        await store(conn, [big, small])
    await rig.tick(T)
    await rig.tick(T + MINUTE)
    by_id = {}
    for d in (big, small):
        deliveries = await rig.deliveries(str(d.notification.notification_id))
        by_id[d.notification.subject] = deliveries["kafka"]
    assert (by_id["big"]["status"], by_id["big"]["attempts"]) == ("dead", 1)
    assert "MessageSizeTooLarge" in by_id["big"]["last_error"]
    assert (by_id["small"]["status"], by_id["small"]["attempts"]) == ("sent", 1)
    mine = str(big.notification.notification_id).encode()
    records = await read_topic(rig.settings.bootstrap_servers(), DEAD_LETTER,
                               lambda rs: any(mine in r.value for r in rs))  # fmt: skip
    [letter] = [json.loads(r.value) for r in records if mine in r.value]
    assert letter["kind"] == "notification_undeliverable" and letter["channel"] == "kafka"
    assert letter["notification"]["body"] == "长" * 4000


async def test_a_digest_lists_its_first_deals_and_counts_them_all(rig: NotifyRig) -> None:  # noqa: F811
    """A team's weekly digest stays one message: the 200 most overdue deals, and how many more."""
    deals = [Deal(T) for _ in range(DIGEST_LINES + 10)]
    for deal in deals:
        await rig.feed(deal.take())
    await rig.tick(T + 7 * DAY)  # Monday 2026-11-23, 09:00 in Shanghai is 01:00 UTC
    [digest] = await rig.notifications("weekly_digest")
    assert len(digest["lines"]) == DIGEST_LINES and len(set(digest["lines"][0])) > 1
    assert f"{DIGEST_LINES + 10} 项需关注" in digest["subject"]
    assert digest["body"].count("\n  - ") == DIGEST_LINES and "……另有 10 项" in digest["body"]


async def test_replaying_every_event_from_the_start_sends_nothing_new(rig: NotifyRig) -> None:  # noqa: F811
    deals = [Deal(T), Deal(T, amount="500000.00"), Deal(T + DAY)]
    deals[2].o.log_follow_up("call", "x", "rep.wang", T + 2 * DAY)
    for deal in deals:
        await rig.feed(deal.take())
    await rig.tick(T + 40 * DAY)
    issued = await rig.notifications()
    assert len(issued) >= 8
    everything = [e for deal in deals for e in deal.log]
    assert await rig.feed(everything) == []  # a redelivery is skipped outright
    # A rebuild from an empty read model (what an operator's replay does) re-arms every timer;
    # the notifications behind them keep their keys, so nothing goes out again.
    await rig.pool.execute("TRUNCATE stream_position, opportunity_picture, timer")
    assert len(await rig.feed(everything)) == len(everything)
    done = await rig.tick(T + 40 * DAY)
    assert done["timers_fired"] > 0 and done["notifications"] == 0 and done["deliveries"] == 0
    assert await rig.notifications() == issued


async def test_two_notify_processes_on_one_backlog_send_every_reminder_exactly_once(
    rig: NotifyRig,  # noqa: F811
    stack: DevStack,
    schema: str,
) -> None:
    deals = [Deal(T) for _ in range(3000)]
    for start in range(0, len(deals), 500):
        await rig.feed([e for deal in deals[start : start + 500] for e in deal.take()])
    env = {**os.environ, **stack.env()}
    now = (T + 3 * DAY).isoformat()
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.integration.notify_worker",
            schema,
            now,
            name,
            env=env,
            stdout=asyncio.subprocess.PIPE,
        )
        for name in ("replica-a", "replica-b")
    ]
    outputs = [json.loads((await w.communicate())[0].decode().splitlines()[-1]) for w in workers]
    assert [w.returncode for w in workers] == [0, 0]
    assert sum(o["timers_fired"] for o in outputs) == 3000
    assert sum(o["notifications"] for o in outputs) == 3000
    assert sum(o["sent"] for o in outputs) == 3000
    print("work split between the replicas:", outputs)
    counts = await rig.pool.fetchrow(
        "SELECT count(*) AS n, count(*) FILTER (WHERE status = 'sent' AND attempts = 1) AS once"
        " FROM delivery"
    )
    assert (counts["n"], counts["once"]) == (3000, 3000)
    ids = {
        str(r["notification_id"])
        for r in await rig.pool.fetch("SELECT notification_id FROM notification")
    }
    records = await read_topic(
        rig.settings.bootstrap_servers(),
        NOTIFICATION_EVENTS,
        lambda rs: ids <= {json.loads(r.value)["event_id"] for r in rs},
        within=60,
    )
    sent = [json.loads(r.value)["event_id"] for r in records]
    mine = [i for i in sent if i in ids]
    assert len(mine) == len(set(mine)) == 3000  # on the bus once each


async def test_who_was_told_what_is_readable_by_the_roles_that_may_see_the_opportunity(
    rig: NotifyRig,  # noqa: F811
) -> None:
    deal = Deal(T)
    await rig.feed(deal.take())
    await rig.tick(T + 3 * DAY)
    await rig.tick(T + 5 * DAY)
    api = create_api(rig.settings, rig.pool, lambda: None)
    secret = rig.settings.secret_for_tokens()

    def auth(role: Role, user: str, team: str | None = None) -> dict[str, str]:
        token = issue_token(Principal(role=role, user=user, team=team), secret,
                            datetime.now(UTC), timedelta(hours=1))  # fmt: skip
        return {"Authorization": f"Bearer {token}"}

    url = f"/v1/notifications?opportunity_id={deal.id}"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(api), base_url="http://n") as http:
        assert (await http.get(url)).status_code == 401
        seen = {}
        for who in [
            auth(Role.rep, "rep.wang"), auth(Role.rep, "rep.li"),
            auth(Role.manager, "mgr.zhao", "east"), auth(Role.manager, "mgr.karl", "berlin"),
            auth(Role.ops, "ops1"), auth(Role.admin, "root"), auth(Role.partner, "acme"),
        ]:  # fmt: skip
            answer = await http.get(url, headers=who)
            seen[len(seen)] = (answer.status_code, len(answer.json()) if answer.is_success else 0)
        assert list(seen.values()) == [(200, 2), (404, 0), (200, 2), (404, 0), (200, 2), (200, 2),
                                       (403, 0)]  # fmt: skip
        body = (await http.get(url, headers=auth(Role.ops, "ops1"))).json()
        assert [(n["kind"], n["recipient"]) for n in body] == [
            ("follow_up_due", "rep.wang"),
            ("escalation", "mgr.zhao"),
        ]
        assert body[0]["deliveries"] == [
            {"channel": "kafka", "address": None, "status": "sent", "attempts": 1,
             "last_error": None, "sent_at": body[0]["deliveries"][0]["sent_at"]},
        ]  # fmt: skip
        assert body[0]["deliveries"][0]["sent_at"].startswith("2026-11-19")  # the tick's time
        mine = await http.get("/v1/notifications", headers=auth(Role.rep, "rep.li"))
        assert mine.status_code == 200 and mine.json() == []
        timers = await http.get(f"/v1/timers?opportunity_id={deal.id}",
                                headers=auth(Role.rep, "rep.wang"))  # fmt: skip
        assert {t["kind"] for t in timers.json()} == {"follow_up", "escalate_manager", "stale"}
        assert all(t["fired_at"] for t in timers.json() if t["kind"] != "stale")


async def test_a_closed_deal_keeps_no_timers_and_an_open_one_keeps_its_own(
    rig: NotifyRig,  # noqa: F811
) -> None:
    async def timers_of(deal: Deal) -> set[str]:
        rows = await rig.pool.fetch("SELECT kind FROM timer WHERE opportunity_id = $1", deal.id)
        return {r["kind"] for r in rows}

    lost, still_open = Deal(T), Deal(T)
    await rig.feed([*lost.take(), *still_open.take()])
    open_timers = {"follow_up", "escalate_manager", "stale"}
    assert await timers_of(lost) == await timers_of(still_open) == open_timers

    # Lost in a later batch, beside a deal opened and lost within that same batch.
    lost.o.lose(rig.rules.loss_reasons[0], "rep.wang", T + DAY, rig.rules)
    at_once = Deal(T)
    at_once.o.lose(rig.rules.loss_reasons[0], "rep.wang", T + DAY, rig.rules)
    await rig.feed([*lost.take(), *at_once.take()])
    assert await timers_of(lost) == set()
    assert await timers_of(at_once) == set()
    assert await timers_of(still_open) == open_timers

    await rig.tick(T + 30 * DAY)  # nothing is told about the closed deals
    told = {n["opportunity_id"] for n in await rig.notifications() if n["opportunity_id"]}
    assert told == {str(still_open.id)}


async def test_replicas_racing_on_new_deals_leave_no_timers_of_a_lost_one(
    rig: NotifyRig,  # noqa: F811
) -> None:
    """One replica's batch opens the deals; another's, after a rebalance, opens and loses them.
    Whichever commits first, the other's batch is decided again seeing it, and no timer of a
    lost deal is left."""
    for _round in range(5):
        deals = [Deal(T) for _ in range(20)]
        opening = [e for d in deals for e in d.take()]
        for deal in deals:
            deal.o.lose(rig.rules.loss_reasons[0], "rep.wang", T + DAY, rig.rules)
        losing = [*opening, *(e for d in deals for e in d.take())]
        project = timer_projector(rig.rules)
        await asyncio.gather(
            apply_read_model(rig.pool, opening, project),
            apply_read_model(rig.pool, losing, project),
        )
        ids = [d.id for d in deals]
        left = await rig.pool.fetchval(
            "SELECT count(*) FROM timer WHERE opportunity_id = ANY($1::uuid[])", ids
        )
        statuses = await rig.pool.fetch(
            "SELECT DISTINCT status FROM opportunity_picture WHERE opportunity_id = ANY($1)", ids
        )
        assert left == 0
        assert [r["status"] for r in statuses] == ["lost"]
