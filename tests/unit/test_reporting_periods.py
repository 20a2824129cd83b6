"""Period over period (环比, SPEC §6): a calendar period is compared with the calendar period
before it, a part of one with the same part of the one before; any other span with the span of
its length just before it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from services.reporting.domain import next_period, period_start, previous_period


def d(month: int, day: int, year: int = 2026) -> datetime:
    return datetime(year, month, day, tzinfo=UTC)


def test_the_period_before_a_calendar_period_is_the_calendar_period_before() -> None:
    assert previous_period(d(3, 1), d(4, 1), UTC) == (d(2, 1), d(3, 1))  # March: February, 28 days
    assert previous_period(d(3, 1), d(3, 16), UTC) == (d(2, 1), d(2, 16))  # month to date
    assert previous_period(d(3, 1), d(3, 31), UTC) == (d(2, 1), d(3, 1))  # longer than February
    assert previous_period(d(4, 1), d(7, 1), UTC) == (d(1, 1), d(4, 1))  # Q2: Q1
    assert previous_period(d(1, 1), d(2, 1), UTC) == (d(12, 1, 2025), d(1, 1))  # across the year
    assert previous_period(d(11, 23), d(11, 30), UTC) == (d(11, 16), d(11, 23))  # a week (Monday)
    assert previous_period(d(11, 25), d(11, 25) + timedelta(hours=9), UTC) == (
        d(11, 24), d(11, 24) + timedelta(hours=9))  # fmt: skip


def test_any_other_span_is_compared_with_the_span_of_its_length_before_it() -> None:
    assert previous_period(d(3, 5), d(3, 15), UTC) == (d(2, 23), d(3, 5))
    assert previous_period(d(2, 1), d(4, 1), UTC) == (d(12, 4, 2025), d(2, 1))  # 59 days
    assert previous_period(d(4, 1), d(5, 20), UTC) == (d(1, 1), d(2, 19))  # quarter to date


SHANGHAI = ZoneInfo("Asia/Shanghai")
NEW_YORK = ZoneInfo("America/New_York")


def local(month: int, day: int, zone: ZoneInfo, hour: int = 0) -> datetime:
    return datetime(2026, month, day, hour, tzinfo=zone)


def test_calendar_periods_are_counted_in_the_reports_time_zone() -> None:
    """Shanghai's March starts at 16:00 UTC on 28 February: 20:00 UTC on 31 March is April."""
    late = datetime(2026, 3, 31, 20, tzinfo=UTC)
    assert period_start(late, "month", SHANGHAI) == local(4, 1, SHANGHAI)
    assert period_start(late, "month", UTC) == d(3, 1)
    assert period_start(late, "quarter", SHANGHAI) == local(4, 1, SHANGHAI)
    assert period_start(late, "week", SHANGHAI) == local(3, 30, SHANGHAI)  # Wednesday 1 April
    assert next_period(local(3, 1, SHANGHAI), "month", SHANGHAI) == local(4, 1, SHANGHAI)
    march = (local(3, 1, SHANGHAI), local(4, 1, SHANGHAI))
    assert previous_period(*march, SHANGHAI) == (local(2, 1, SHANGHAI), local(3, 1, SHANGHAI))
    # Shanghai's March, asked of a UTC calendar, is no calendar period: the span before it.
    assert previous_period(*march, UTC) == (march[0] - (march[1] - march[0]), march[0])


def test_a_day_across_a_change_of_clocks_ends_at_the_next_local_midnight() -> None:
    """New York's clocks go forward on 8 March 2026: that day is 23 hours long. (Its start as
    the API has it, in UTC: 24 hours on from it would be 01:00 on 9 March.)"""
    start = local(3, 8, NEW_YORK).astimezone(UTC)
    assert next_period(start, "day", NEW_YORK) == local(3, 9, NEW_YORK)
    hours = local(3, 9, NEW_YORK).astimezone(UTC) - local(3, 8, NEW_YORK).astimezone(UTC)
    assert hours == timedelta(hours=23)
    assert next_period(local(3, 2, NEW_YORK), "week", NEW_YORK) == local(3, 9, NEW_YORK)


def test_part_of_a_month_given_in_two_zones_is_compared_in_the_zones_clock_time() -> None:
    """1-15 March from Shanghai's midnight to a `to` given in UTC: 1-15 February, whatever
    zone each end was given in."""
    begin, finish = local(3, 1, SHANGHAI), local(3, 15, SHANGHAI).astimezone(UTC)
    assert previous_period(begin, finish, SHANGHAI) == (local(2, 1, SHANGHAI),
                                                         local(2, 15, SHANGHAI))  # fmt: skip
    begin, finish = local(3, 1, NEW_YORK), local(3, 15, NEW_YORK).astimezone(UTC)  # across DST
    assert previous_period(begin, finish, NEW_YORK) == (local(2, 1, NEW_YORK),
                                                         local(2, 15, NEW_YORK))  # fmt: skip
