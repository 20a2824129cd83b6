"""Wiring of the reporting service: `python -m services.reporting` or `dealstream reporting`."""

from __future__ import annotations

from services.reporting.api import create_api
from services.reporting.bus import opportunity_events
from services.reporting.projection import MIGRATIONS, SCHEMA, SERVICE_POOL_SETTINGS
from shared.logs import setup_logging
from shared.runtime import Readiness, open_schema, run_service, serve
from shared.settings import Settings
from shared.tracing import setup_tracing


async def main(settings: Settings) -> None:
    setup_logging("reporting", settings.log_level)
    setup_tracing("reporting", settings.otel)
    pool = await open_schema(settings, SCHEMA, MIGRATIONS, server=SERVICE_POOL_SETTINGS)
    events = opportunity_events(pool, settings)
    readiness = Readiness(settings, pool, [events])
    api = create_api(settings, pool, lambda: readiness)
    try:
        await serve(api, settings.reporting_port, [events.run], settings.http_host)
    finally:
        await pool.close()


if __name__ == "__main__":
    run_service(main(Settings()))
