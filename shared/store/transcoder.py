"""The stored events' JSON, through orjson: what the relay, replays, audits and exports spend most
of their time on reading, and every save on writing. The library's transcoder uses the standard
`json` module with an object hook (reading) and a default hook (writing) per object.

Reading parses with orjson, then revives the `{"_type_", "_data_"}` objects (UUID, Decimal,
datetime) with the library's own hook, inside out as `json` does. Writing first turns what `json`
would hand to the default hook into those objects (orjson writes UUIDs, datetimes and enums itself,
which would change what is stored), then lets orjson write plain JSON; what orjson writes
differently from `json` (a non-finite float, a key that is not a string, an integer beyond 64 bits)
goes to the library's encoder. A property test holds both directions equal to the library's."""

from __future__ import annotations

from typing import Any

import orjson
from eventsourcing.persistence import JSONTranscoder

_NATIVE = (str, int, bool, type(None))
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_LONG_RUN = b"0" * 19
_PLAIN = (str, bool, type(None))  # as they are, wherever they are
_INT_MIN, _INT_END = -(2**63), 2**64  # the integers orjson writes as `json` does


class OrjsonTranscoder(JSONTranscoder):
    def encode(self, obj: Any) -> bytes:
        try:
            return orjson.dumps(self._plain(obj))
        except (_Unlike, orjson.JSONEncodeError):
            return super().encode(obj)

    def _plain(self, value: Any) -> Any:
        """`value` as the JSON values `json` writes for it, transcodings applied."""
        if isinstance(value, _NATIVE):
            if type(value) is int and not _INT_MIN <= value < _INT_END:
                raise _Unlike
            return value
        if isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise _Unlike
            return value
        if isinstance(value, dict):
            return self._plain_dict(value)
        if isinstance(value, list | tuple):
            return [item if type(item) in _PLAIN else self._plain(item) for item in value]
        return self._plain(self._encode_obj(value))

    def _plain_dict(self, value: dict[Any, Any]) -> dict[str, Any]:
        """A dict's items, the usual ones (text, small integers, nested dicts: an event's
        payload) handled here rather than by a call each: a third of `_plain`'s time."""
        plain = {}
        for key, item in value.items():
            if type(key) is not str:
                raise _Unlike
            kind = type(item)
            if kind in _PLAIN:
                plain[key] = item
            elif kind is int:
                if not _INT_MIN <= item < _INT_END:
                    raise _Unlike
                plain[key] = item
            elif kind is dict:
                plain[key] = self._plain_dict(item)
            else:
                plain[key] = self._plain(item)
        return plain

    def decode(self, data: bytes) -> Any:
        parsed = read_plain(data)
        return super().decode(data) if parsed is NOT_PLAIN else self._revive(parsed)

    def _revive(self, value: Any) -> Any:
        if type(value) is dict:
            for key, item in value.items():
                if type(item) is dict or type(item) is list:
                    value[key] = self._revive(item)
            return self._decode_obj(value) if len(value) == 2 and "_type_" in value else value
        if type(value) is list:
            return [
                self._revive(item) if type(item) is dict or type(item) is list else item
                for item in value
            ]
        return value


NOT_PLAIN = object()


def read_plain(data: bytes) -> Any:
    """orjson's reading of stored JSON, or NOT_PLAIN where only `json` reads it as written: an
    integer beyond 64 bits (orjson would read a float), or what orjson refuses (NaN, say)."""
    if long_number(data):
        return NOT_PLAIN
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return NOT_PLAIN


def long_number(data: bytes) -> bool:
    """Whether `data` holds 19 digits in a row: an integer that may be beyond 64 bits (or such
    digits in a string: then the slow way is taken needlessly). Every digit made a 0, then one
    search for 19 of them: 1.3 us for an event of 1.3 kB, where `re`'s search for `[0-9]{19}`
    took 12 us, six times orjson's parse of it (measured here)."""
    return _LONG_RUN in data.translate(_DIGITS_AS_ZERO)


class _Unlike(Exception):
    """A value orjson would write unlike `json`."""
