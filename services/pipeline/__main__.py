"""Wiring of the pipeline service: `python -m services.pipeline` or `dealstream pipeline`."""

from __future__ import annotations

import asyncio

from services.pipeline.api import create_api
from services.pipeline.app import MIGRATIONS, SCHEMA, PipelineApp
from services.pipeline.bus import lead_events, route
from shared.bus.relay_process import RelaySpec, relay_for
from shared.clock import SystemClock
from shared.logs import setup_logging
from shared.runtime import Readiness, open_schema, run_service, scheduled, serve
from shared.settings import Settings
from shared.tracing import setup_tracing


async def main(settings: Settings) -> None:
    setup_logging("pipeline", settings.log_level)
    setup_tracing("pipeline", settings.otel)
    pool = await open_schema(settings, SCHEMA, MIGRATIONS)
    app = await asyncio.to_thread(PipelineApp, settings.dsn(), SCHEMA)
    clock = SystemClock()
    relay = relay_for(RelaySpec("pipeline", PipelineApp, SCHEMA, route), settings, app, pool)
    leads = lead_events(app, settings)
    readiness = Readiness(settings, pool, [leads], relay)
    api = create_api(app, settings, pool, clock, lambda: readiness)
    recycle = scheduled(
        "recycling",
        lambda: app.recycle_idle(clock.now(), settings.rules()),
        settings.recycle_tick_seconds,
    )
    merges = scheduled("pending merges", app.settle_pending_merges, 5.0)
    loops = [relay.run, leads.run, recycle, merges]
    try:
        await serve(api, settings.pipeline_port, loops, settings.http_host)
    finally:
        app.close()
        await pool.close()


if __name__ == "__main__":
    run_service(main(Settings()))
