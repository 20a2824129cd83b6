"""The OpenTelemetry hooks: no spans unless switched on; on, a span per block with the
correlation id current in it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from shared import tracing
from shared.runtime import correlate

EXPORTER = InMemorySpanExporter()


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    if not isinstance(trace.get_tracer_provider(), TracerProvider):  # set once per process
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
        trace.set_tracer_provider(provider)
    EXPORTER.clear()
    yield EXPORTER
    tracing.setup_tracing("test", enabled=False)


def test_off_by_default_nothing_is_recorded(exporter: InMemorySpanExporter) -> None:
    assert tracing.setup_tracing("test", enabled=False) is False
    with tracing.span("consume lead.events.v1", partition=1):
        pass
    assert exporter.get_finished_spans() == ()


async def test_on_each_request_is_a_span_with_its_correlation_id(
    exporter: InMemorySpanExporter,
) -> None:
    assert tracing.setup_tracing("pipeline", enabled=True) is True
    api = correlate(FastAPI())

    @api.post("/v1/leads")
    async def lead() -> dict[str, str]:
        return {"ok": "yes"}

    transport = httpx.ASGITransport(api)
    async with httpx.AsyncClient(transport=transport, base_url="http://pipeline") as http:
        answer = await http.post("/v1/leads", headers={"x-request-id": "req-9"})
    assert answer.status_code == 200
    # (FastAPI adds spans of its own for the endpoint and its dependencies, inside this one.)
    (recorded,) = [s for s in exporter.get_finished_spans() if s.name == "HTTP POST"]
    assert recorded.attributes is not None
    assert recorded.attributes["dealstream.correlation_id"] == "req-9"
    assert recorded.attributes["http.target"] == "/v1/leads"
    assert recorded.instrumentation_scope is not None
    assert recorded.instrumentation_scope.name == "dealstream.pipeline"
