"""Wiring of the pipeline service: `python -m services.pipeline` or `dealstream pipeline`."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

from services.pipeline.app import MIGRATIONS, SCHEMA, PipelineApp
from services.pipeline.bus import lead_events, route
from shared.bus.relay import OutboxRelay
from shared.logs import setup_logging
from shared.runtime import Readiness, health_router, open_schema, run_service, serve
from shared.settings import Settings


async def main(settings: Settings) -> None:
    setup_logging("pipeline", settings.log_level)
    pool = await open_schema(settings, SCHEMA, MIGRATIONS)
    app = await asyncio.to_thread(PipelineApp, settings.dsn(), SCHEMA)
    relay = OutboxRelay("pipeline", app, route, settings, pool)
    leads = lead_events(app, settings)
    readiness = Readiness(settings, pool, [leads], relay)
    api = FastAPI(title="DealStream pipeline", version="1")
    api.include_router(health_router(lambda: readiness))
    try:
        await serve(api, settings.pipeline_port, [relay.run, leads.run], settings.http_host)
    finally:
        app.close()
        await pool.close()


if __name__ == "__main__":
    run_service(main(Settings()))
