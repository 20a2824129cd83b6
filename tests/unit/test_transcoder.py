"""The stored events' JSON read with orjson gives exactly what the library's own transcoder
gives, for anything the library's transcoder writes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from eventsourcing.persistence import DatetimeAsISO, DecimalAsStr, JSONTranscoder, UUIDAsHex
from hypothesis import given
from hypothesis import strategies as st

from shared.store.transcoder import OrjsonReadingTranscoder


def _registered(transcoder: JSONTranscoder) -> JSONTranscoder:
    for transcoding in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO()):
        transcoder.register(transcoding)
    return transcoder


LIBRARY, OURS = _registered(JSONTranscoder()), _registered(OrjsonReadingTranscoder())

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.text()
    | st.uuids()
    | st.decimals(allow_nan=False, allow_infinity=False)
    | st.datetimes(timezones=st.just(UTC))
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)


values = st.recursive(leaves, _containers, max_leaves=20)


@given(st.dictionaries(st.text(max_size=8), values, max_size=6))
def test_orjson_reading_equals_the_librarys(state: dict[str, Any]) -> None:
    stored = LIBRARY.encode(state)
    assert OURS.decode(stored) == LIBRARY.decode(stored)


def test_an_event_state_revives_its_types() -> None:
    state = {
        "timestamp": datetime(2026, 11, 23, 5, 0, tzinfo=UTC),
        "payload": {"amount": Decimal("12.50"), "ids": [uuid.UUID(int=7)], "n": 2**70},
        "correlation_id": "req-1",
    }
    assert OURS.decode(LIBRARY.encode(state)) == state  # 2**70: orjson refuses, json reads it
