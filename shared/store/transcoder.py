"""The stored events' JSON, read with orjson: what the relay, replays, audits and exports spend
most of their time on. The library's transcoder decodes with the standard `json` module and an
object hook per object; this one parses with orjson, then revives the `{"_type_", "_data_"}`
objects (UUID, Decimal, datetime) with the library's own hook, inside out as `json` does. Writing
stays the library's: orjson writes UUIDs and datetimes itself instead of asking for their
transcoding, which would change what is stored."""

from __future__ import annotations

from typing import Any

import orjson
from eventsourcing.persistence import JSONTranscoder


class OrjsonReadingTranscoder(JSONTranscoder):
    def decode(self, data: bytes) -> Any:
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:  # what orjson refuses (a 65-bit integer, say)
            return super().decode(data)
        return self._revive(parsed)

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
