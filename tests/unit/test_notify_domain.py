"""Notify's rules (SPEC §5) on events made by pipeline's own aggregate: when follow-ups fall
due, who is escalated to, which events move or cancel the timers, when the weekly digest is
due in a team's zone (daylight saving included), and the texts in both locales."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from email.message import EmailMessage

from hypothesis import given, settings
from hypothesis import strategies as st

from services.notify.domain import (
    Picture,
    Recipient,
    chain,
    digest_time,
    fold,
    recipients_of,
    timers,
)
from services.notify.firing import _local
from services.notify.templates import render
from services.pipeline.domain import Refused
from shared.contracts.common import Money
from shared.contracts.envelope import Envelope
from shared.settings import Rules
from tests.notify_support import DIRECTORY, RULES, Deal

T = datetime(2026, 11, 16, 1, 0, tzinfo=UTC)  # a Monday, 09:00 in Shanghai
DAY = timedelta(days=1)


def picture(envelopes: list[Envelope], start: Picture | None = None) -> Picture:
    p = start
    for e in envelopes:
        p = fold(p, e.event_type, e.event_id, e.data)
    assert p is not None
    return p


def test_a_new_opportunity_is_due_for_follow_up_after_its_stage_days_and_escalates_two_later() -> (
    None
):
    deal = Deal(T)
    p = picture(deal.take())
    opened = deal.log[0].event_id
    assert (p.owner, p.team, p.tier, p.stage) == ("rep.wang", "east", "normal", "A")
    assert timers(p, RULES) == {
        "follow_up": (T + 3 * DAY, opened),
        "escalate_manager": (T + 5 * DAY, opened),
        "stale": (T + 30 * DAY, deal.log[-1].event_id),  # the assignment was the last activity
    }


def test_a_major_deal_escalates_to_the_branch_manager_at_once() -> None:
    p = picture(Deal(T, amount="300000.00").take())
    assert p.tier == "major"
    found = timers(p, RULES)
    assert found["escalate_branch"][0] == found["follow_up"][0] == T + 3 * DAY
    [branch] = recipients_of("escalate_branch", p, RULES)
    assert (branch.user, branch.role, branch.email) == (
        "vp.sun",
        "branch_manager",
        "sun@example.cn",
    )
    assert chain(p, RULES) == ["rep.wang", "mgr.zhao", "vp.sun"]


def test_a_logged_follow_up_restarts_the_clock_and_a_promised_date_brings_it_forward() -> None:
    deal = Deal(T)
    p = picture(deal.take())
    deal.o.log_follow_up("call", "budget confirmed", "rep.wang", T + DAY)
    p = picture(deal.take(), p)
    logged = deal.log[-1].event_id
    assert timers(p, RULES)["follow_up"] == (T + 4 * DAY, logged)
    assert timers(p, RULES)["stale"] == (T + 31 * DAY, logged)
    deal.o.log_follow_up("visit", "demo", "rep.wang", T + 2 * DAY, next_follow_up_at=T + 3 * DAY)
    p = picture(deal.take(), p)
    assert timers(p, RULES)["follow_up"][0] == T + 3 * DAY  # sooner than the rule's T + 5d
    deal.o.log_follow_up("call", "later", "rep.wang", T + 3 * DAY, next_follow_up_at=T + 30 * DAY)
    p = picture(deal.take(), p)
    assert timers(p, RULES)["follow_up"][0] == T + 6 * DAY  # the rule still holds


def test_a_stage_change_starts_the_new_stage_clock_and_an_outcome_cancels_the_timers() -> None:
    deal = Deal(T, budget={"amount": "30000.00", "currency": "CNY"}, authority="decision_maker")
    p = picture(deal.take())
    deal.o.change_stage("B", "rep.wang", T + DAY, RULES)
    p = picture(deal.take(), p)
    assert timers(p, RULES)["follow_up"] == (T + 6 * DAY, deal.log[-1].event_id)
    deal.o.lose("price", "rep.wang", T + 2 * DAY, RULES, note="too dear")
    p = picture(deal.take(), p)
    assert p.status == "lost" and timers(p, RULES) == {}
    deal.o.reopen("mgr.zhao", T + 3 * DAY, RULES, note="they called back")
    p = picture(deal.take(), p)
    assert timers(p, RULES)["follow_up"] == (T + 8 * DAY, deal.log[-1].event_id)


def test_recycling_leaves_only_the_pool_managers_notice_and_reactivation_restarts_the_clock() -> (
    None
):
    deal = Deal(T)
    p = picture(deal.take())
    deal.o.recycle(T + 61 * DAY, RULES)
    p = picture(deal.take(), p)
    recycled = deal.log[-1].event_id
    assert timers(p, RULES) == {"recycled": (T + 61 * DAY, recycled)}
    [manager] = recipients_of("recycled", p, RULES)
    assert manager.user == "mgr.zhao"
    deal.o.reactivate("rep.li", "east", "mgr.zhao", T + 62 * DAY)
    p = picture(deal.take(), p)
    assert p.owner == "rep.li" and timers(p, RULES)["follow_up"][0] == T + 65 * DAY


def test_a_reassignment_gives_the_new_owner_the_full_period() -> None:
    deal = Deal(T)
    p = picture(deal.take())
    deal.o.assign("rep.li", "east", "mgr.zhao", T + 2 * DAY)
    p = picture(deal.take(), p)
    assert p.owner == "rep.li" and timers(p, RULES)["follow_up"][0] == T + 5 * DAY


def test_follow_up_days_can_be_set_per_tier_and_stage() -> None:
    rules = Rules.model_validate(
        {"directory": DIRECTORY, "notify": {"follow_up_days_by_tier": {"major": {"A": 1}}}}
    )
    major = picture(Deal(T, amount="300000.00", rules=rules).take())
    normal = picture(Deal(T, rules=rules).take())
    assert timers(major, rules)["follow_up"][0] == T + DAY
    assert timers(normal, rules)["follow_up"][0] == T + 3 * DAY


def test_the_expected_close_reminder_falls_at_midnight_after_the_date_in_the_teams_zone() -> None:
    shanghai = picture(Deal(T, expected_close="2026-12-31").take())
    berlin = picture(Deal(T, owner="rep.anna", team="berlin", expected_close="2026-12-31").take())
    assert timers(shanghai, RULES)["expected_close"][0] == datetime(2026, 12, 31, 16, tzinfo=UTC)
    assert timers(berlin, RULES)["expected_close"][0] == datetime(2026, 12, 31, 23, tzinfo=UTC)


def test_an_expected_close_with_no_day_after_it_schedules_no_reminder_and_raises_nothing() -> None:
    # An event stored before leads were bound (capture now refuses a close past 2100).
    last = replace(picture(Deal(T, expected_close="2100-12-31").take()), expected_close=date.max)
    assert "expected_close" not in timers(last, RULES)
    assert "follow_up" in timers(last, RULES)


def test_a_time_at_the_calendars_start_is_written_in_utc_where_no_local_time_exists() -> None:
    london = Recipient("rep.anna", "rep", "en", None, "Europe/London")
    assert _local(datetime(1, 1, 1, tzinfo=UTC), london) == "0001-01-01T00:00:00Z"
    assert _local(T, london) == "2026-11-16 01:00 GMT"


def test_unowned_follow_ups_go_to_the_team_manager() -> None:
    p = picture(Deal(T, owner=None).take())
    [who] = recipients_of("follow_up", p, RULES)
    assert (who.user, who.role) == ("mgr.zhao", "manager")


def test_the_weekly_digest_is_monday_0900_local_through_daylight_saving() -> None:
    # Berlin: CET (UTC+1) in winter, CEST (UTC+2) from 2026-03-29.
    assert digest_time("berlin", datetime(2026, 3, 23, 8, 0, tzinfo=UTC), RULES) == datetime(
        2026, 3, 23, 8, 0, tzinfo=UTC
    )
    assert digest_time("berlin", datetime(2026, 3, 30, 6, 59, tzinfo=UTC), RULES) is None
    assert digest_time("berlin", datetime(2026, 3, 30, 7, 0, tzinfo=UTC), RULES) == datetime(
        2026, 3, 30, 7, 0, tzinfo=UTC
    )
    # Back to CET on 2026-10-25: Monday 09:00 is 08:00 UTC again.
    assert digest_time("berlin", datetime(2026, 10, 26, 7, 59, tzinfo=UTC), RULES) is None
    assert digest_time("berlin", datetime(2026, 10, 26, 8, 0, tzinfo=UTC), RULES) is not None
    # Shanghai (UTC+8, no daylight saving): Monday 09:00 is Monday 01:00 UTC.
    assert digest_time("east", datetime(2026, 11, 23, 1, 0, tzinfo=UTC), RULES) == datetime(
        2026, 11, 23, 1, 0, tzinfo=UTC
    )
    # Within the grace day it is still due (notify was down); on Tuesday afternoon it is not.
    assert digest_time("east", datetime(2026, 11, 23, 23, 0, tzinfo=UTC), RULES) is not None
    assert digest_time("east", datetime(2026, 11, 24, 2, 0, tzinfo=UTC), RULES) is None


def test_texts_follow_the_recipients_locale() -> None:
    values = {"title": "Northwind", "company": "Northwind", "stage": "B", "link": "http://x/1",
              "due": "2026-11-19", "overdue": 2, "chain": "a → b"}  # fmt: skip
    zh = render("escalation", "zh-CN", RULES, **values)
    en = render("escalation", "en", RULES, **values)
    assert "已逾期 2 天" in zh.subject and "确认商机" in zh.body
    assert "2 day(s) overdue" in en.subject and "confirm" in en.body and "http://x/1" in en.body


def test_a_line_break_in_a_company_name_does_not_break_the_mail_subject() -> None:
    text = render("follow_up_due", "en", RULES, title="Northwind\r\nBcc: x@example.cn",
                  company="Northwind", stage="B", link="http://x/1", due="2026-11-19")  # fmt: skip
    assert "\r" not in text.subject and "\n" not in text.subject
    EmailMessage()["Subject"] = text.subject  # refused a header with a line break in it


COMMANDS = st.lists(
    st.sampled_from(
        ["stage", "back", "follow", "promise", "lose", "reopen", "win", "assign", "recycle",
         "reactivate", "amount"]
    ),
    max_size=25,
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(COMMANDS)
def test_any_life_keeps_notifys_picture_in_step_with_pipeline(commands: list[str]) -> None:
    """Whatever happens to an opportunity, notify's folded picture agrees with pipeline's
    aggregate, and the timers are exactly what an open or closed opportunity needs."""
    deal = Deal(T, budget={"amount": "30000.00", "currency": "CNY"}, authority="decision_maker")
    p = picture(deal.take())
    now = T
    stages = "ABCDEF"
    for command in commands:
        now += timedelta(hours=7)
        o = deal.o
        try:
            if command == "stage" and o.stage < "E":
                o.change_stage(stages[stages.index(o.stage) + 1], "rep.wang", now, RULES)
            elif command == "back" and "A" < o.stage < "F":
                o.change_stage(stages[stages.index(o.stage) - 1], "rep.wang", now, RULES, note="n")
            elif command == "follow":
                o.log_follow_up("call", "s", "rep.wang", now)
            elif command == "promise":
                o.log_follow_up("call", "s", "rep.wang", now, next_follow_up_at=now + DAY)
            elif command == "lose":
                o.lose("price", "rep.wang", now, RULES)
            elif command == "reopen":
                o.reopen("mgr.zhao", now, RULES)
            elif command == "win":
                o.win(Money(amount="30000.00", currency="CNY"), "rep.wang", now, RULES)
            elif command == "assign":
                o.assign("rep.li", "east", "mgr.zhao", now)
            elif command == "recycle":
                o.recycle(now + 61 * DAY, RULES)
            elif command == "reactivate":
                o.reactivate("rep.wang", "east", "mgr.zhao", now)
            elif command == "amount":
                kind = "proposal" if o.stage == "D" else "expected"
                o.change_amount(kind, Money(amount="250000.00", currency="CNY"), "rep.wang", now,
                                RULES)  # fmt: skip
        except Refused:
            pass
        p = picture(deal.take(), p)
    o = deal.o
    assert (p.status, p.stage, p.owner, p.team) == (o.status, o.stage, o.owner, o.team)
    found = timers(p, RULES)
    if p.status == "open" and p.stage != "F":
        due, derived = found["follow_up"]
        assert due > p.clock_started_at and derived == p.clock_event
        assert found["escalate_manager"][0] == due + 2 * DAY
        assert ("escalate_branch" in found) == (p.tier == "major")
    else:
        assert not {"follow_up", "escalate_manager", "escalate_branch", "stale"} & set(found)
    assert ("recycled" in found) == (p.status == "recycled")
