"""Period over period (环比, SPEC §6): a calendar period is compared with the calendar period
before it, a part of one with the same part of the one before; any other span with the span of
its length just before it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.reporting.domain import previous_period


def d(month: int, day: int, year: int = 2026) -> datetime:
    return datetime(year, month, day, tzinfo=UTC)


def test_the_period_before_a_calendar_period_is_the_calendar_period_before() -> None:
    assert previous_period(d(3, 1), d(4, 1)) == (d(2, 1), d(3, 1))  # March: February, 28 days
    assert previous_period(d(3, 1), d(3, 16)) == (d(2, 1), d(2, 16))  # month to date
    assert previous_period(d(3, 1), d(3, 31)) == (d(2, 1), d(3, 1))  # longer than February
    assert previous_period(d(4, 1), d(7, 1)) == (d(1, 1), d(4, 1))  # Q2: Q1
    assert previous_period(d(1, 1), d(2, 1)) == (d(12, 1, 2025), d(1, 1))  # across the year
    assert previous_period(d(11, 23), d(11, 30)) == (d(11, 16), d(11, 23))  # a week (Monday)
    assert previous_period(d(11, 25), d(11, 25) + timedelta(hours=9)) == (
        d(11, 24), d(11, 24) + timedelta(hours=9))  # fmt: skip


def test_any_other_span_is_compared_with_the_span_of_its_length_before_it() -> None:
    assert previous_period(d(3, 5), d(3, 15)) == (d(2, 23), d(3, 5))
    assert previous_period(d(2, 1), d(4, 1)) == (d(12, 4, 2025), d(2, 1))  # 59 days
    assert previous_period(d(4, 1), d(5, 20)) == (d(1, 1), d(2, 19))  # quarter to date
