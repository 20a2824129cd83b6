"""The stored events' JSON through orjson is exactly the library's own transcoder's: what it
writes reads back the same with either, and what it reads equals the library's reading."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from eventsourcing.persistence import DatetimeAsISO, DecimalAsStr, JSONTranscoder, UUIDAsHex
from hypothesis import given
from hypothesis import strategies as st

from shared.store.transcoder import OrjsonTranscoder


def _registered(transcoder: JSONTranscoder) -> JSONTranscoder:
    for transcoding in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO()):
        transcoder.register(transcoding)
    return transcoder


LIBRARY, OURS = _registered(JSONTranscoder()), _registered(OrjsonTranscoder())

leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text()
    | st.uuids()
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.datetimes(timezones=st.just(UTC))
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


values = st.recursive(leaves, _containers, max_leaves=20)


def _same(a: Any, b: Any) -> bool:
    """Equal, NaN included (a NaN is not equal to itself)."""
    if isinstance(a, float) and isinstance(b, float) and a != a:
        return b != b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@given(st.dictionaries(st.text(max_size=8) | st.integers(), values, max_size=6))
def test_orjson_reading_and_writing_equal_the_librarys(state: dict[Any, Any]) -> None:
    stored = LIBRARY.encode(state)
    assert _same(OURS.decode(stored), LIBRARY.decode(stored))
    written = OURS.encode(state)
    assert _same(LIBRARY.decode(written), LIBRARY.decode(stored))  # floats may be spelt apart


def test_an_event_state_revives_its_types() -> None:
    state = {
        "timestamp": datetime(2026, 11, 23, 5, 0, tzinfo=UTC),
        "payload": {"amount": Decimal("12.50"), "ids": [uuid.UUID(int=7)], "n": 2**70},
        "correlation_id": "req-1",
    }
    assert OURS.decode(LIBRARY.encode(state)) == state  # 2**70: orjson refuses, json reads it
