"""The one clock: business rules take `now` from here, never from the wall clock directly."""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any, Protocol


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class FixedClock:
    """A clock that stands still until moved: for tests and `tick --now`."""

    def __init__(self, at: datetime) -> None:
        if at.tzinfo is None:
            raise ValueError("FixedClock needs an aware datetime")
        self._at = at

    def now(self) -> datetime:
        return self._at

    def set(self, at: datetime) -> None:
        self._at = at


def utc_iso(at: datetime) -> str:
    """UTC ISO-8601 with `Z`, as every DealStream contract writes times."""
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC)


def asked_time(at: datetime) -> datetime | None:
    """A time a request asks about (`as_of`), in UTC; None when it has no zone or lies outside
    1970-2199: the month and day arithmetic behind the answers, and the conversion to UTC of
    a time near the ends of the calendar, would fail on it (OverflowError, a 500)."""
    if at.tzinfo is None:
        return None
    try:
        utc = at.astimezone(UTC)
    except OverflowError:
        return None
    return utc if EARLIEST <= utc < LATEST else None


def utc_from_iso(value: str) -> datetime:
    """A contract time as this code writes it (ISO-8601 with `Z` or an offset) in UTC, as the
    contracts' UtcTime reads it; a time without a zone is refused."""
    parsed = from_iso(value)
    if parsed.tzinfo is None:
        raise ValueError(f"time must carry a zone (UTC with Z): {value!r}")
    return parsed.astimezone(UTC)


def from_iso(value: Any) -> datetime:
    """A contract time (ISO-8601, `Z` or an offset) as an aware datetime; datetimes pass."""
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value).replace("Z", "+00:00"))


def date_or_none(value: Any) -> date | None:
    """The date an ISO date or time starts with; None for none or free text (such as "Q3")."""
    try:
        return date.fromisoformat(str(value)[:10]) if value else None
    except ValueError:
        return None
