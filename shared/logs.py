"""JSON logs, one object per line; never a secret or contact PII (callers log ids, not data).

Every line logged while a correlation id is current — an HTTP request's (`x-request-id`), or
one set with `correlated` for a message being handled — carries it as `correlation_id`: the id
the events carry from service to service, so one `grep` follows a lead through all four."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

CORRELATION: ContextVar[str] = ContextVar("correlation_id", default="")


@contextmanager
def correlated(correlation_id: str) -> Iterator[None]:
    """Log lines within carry `correlation_id`."""
    token = CORRELATION.set(correlation_id)
    try:
        yield
    finally:
        CORRELATION.reset(token)


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
