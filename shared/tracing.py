"""OpenTelemetry tracing hooks, off by default.

With `DEALSTREAM_OTEL=true` and the `opentelemetry-api` package installed (`pip install
dealstream[otel]`), every consumer batch and every HTTP request is a span; a request's span
carries its correlation id as an attribute. Where spans go is the OpenTelemetry SDK's business,
which the extra does not install: add `opentelemetry-sdk` and an exporter and configure them the
standard way (`opentelemetry-instrument`, `OTEL_EXPORTER_OTLP_ENDPOINT`, …), or set a tracer
provider in code; without one, the API's spans cost next to nothing and go nowhere.
Off, `span` is a no-op context manager: no import, no allocation beyond the call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

log = logging.getLogger(__name__)

_tracer: Any = None


def setup_tracing(service: str, enabled: bool) -> bool:
    """Turn the hooks on for this process (`enabled`: Settings.otel); whether they are on."""
    global _tracer
    if not enabled:
        _tracer = None
        return False
    try:
        from opentelemetry import trace
    except ImportError:
        log.warning("DEALSTREAM_OTEL is on but opentelemetry-api is not installed: no tracing")
        return False
    _tracer = trace.get_tracer(f"dealstream.{service}")
    return True


def span(name: str, **attributes: str | int | float | bool) -> Any:
    """A span named `name` around the block when tracing is on; nothing otherwise."""
    if _tracer is None:
        return nullcontext()
    return _traced(name, attributes)


@contextmanager
def _traced(name: str, attributes: dict[str, Any]) -> Iterator[None]:
    from shared.logs import CORRELATION

    if correlation := CORRELATION.get():
        attributes = {**attributes, "dealstream.correlation_id": correlation}
    with _tracer.start_as_current_span(name, attributes=attributes):
        yield
