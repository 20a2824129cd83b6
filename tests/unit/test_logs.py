"""JSON log lines carry the correlation id current when they are written."""

from __future__ import annotations

import io
import json
import logging

from shared.logs import CORRELATION, JsonFormatter, _ServiceName


def logged(write: object) -> list[dict[str, object]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_ServiceName("pipeline"))
    logger = logging.getLogger("test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        write(logger)  # type: ignore[operator]
    finally:
        logger.removeHandler(handler)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_line_carries_the_current_correlation_id_or_the_one_it_names() -> None:
    def write(logger: logging.Logger) -> None:
        logger.info("outside")
        token = CORRELATION.set("req-1")  # as the HTTP middleware sets it for a request
        try:
            logger.info("inside", extra={"opportunity_id": "o-1"})
            logger.info("named", extra={"correlation_id": "m-7"})  # a message's own id wins
        finally:
            CORRELATION.reset(token)
        logger.info("after")

    lines = logged(write)
    assert [line.get("correlation_id") for line in lines] == [None, "req-1", "m-7", None]
    assert lines[1]["opportunity_id"] == "o-1" and lines[1]["service"] == "pipeline"
