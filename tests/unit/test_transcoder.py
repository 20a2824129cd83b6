"""The stored events' JSON through orjson is exactly the library's own transcoder's: what it
writes reads back the same with either, and what it reads equals the library's reading."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from eventsourcing.persistence import DatetimeAsISO, DecimalAsStr, JSONTranscoder, UUIDAsHex
from hypothesis import given
from hypothesis import strategies as st

from shared.store.transcoder import OrjsonTranscoder, long_number


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


# Runs of digits around 19 long, between the bytes that sit next to numbers in JSON (and any).
_CHUNKS = (
    (st.integers(1, 22) | st.sampled_from([18, 19, 20]))
    .flatmap(lambda n: st.text("0123456789", min_size=n, max_size=n))
    .map(str.encode)
    | st.sampled_from([b'"', b"-", b".", b"e", b":", b"\x00", b"\xff"])
    | st.binary(max_size=6)
)  # fmt: skip


@given(st.lists(_CHUNKS, max_size=8).map(b"".join))
def test_long_number_finds_what_the_regular_expression_finds(data: bytes) -> None:
    assert long_number(data) == bool(re.search(rb"[0-9]{19}", data))


def test_long_number_at_the_edges() -> None:
    assert long_number(b"1" * 19) and long_number(b'{"n":12345678901234567890}')
    assert not long_number(b"9" * 18) and not long_number(b"123456789-123456789-1234")
