"""JSON logs, one object per line; never a secret or contact PII (callers log ids, not data).

A line carries `correlation_id` when one is current — the HTTP request's (`x-request-id`, or a
new one), set for the request by shared.runtime — or when the line names one itself (capture's
line for each partner message names the message's id). It is the id the events carry on from
service to service: grep capture's and pipeline's logs for a request and find its lines."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from typing import Any

CORRELATION: ContextVar[str] = ContextVar("correlation_id", default="")

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_ServiceName(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


class _ServiceName(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        if not hasattr(record, "correlation_id") and (current := CORRELATION.get()):
            record.correlation_id = current
        return True
