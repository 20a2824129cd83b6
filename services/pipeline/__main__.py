"""Wiring of the pipeline service: `python -m services.pipeline` or `dealstream pipeline`."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services.pipeline.api import create_api
from services.pipeline.app import MIGRATIONS, SCHEMA, PipelineApp
from services.pipeline.bus import lead_events, route
from shared.bus.relay import OutboxRelay
from shared.clock import Clock, SystemClock
from shared.logs import setup_logging
from shared.runtime import Loop, Readiness, open_schema, run_service, serve
from shared.settings import Settings

log = logging.getLogger(__name__)


def recycling(app: PipelineApp, settings: Settings, clock: Clock) -> Loop:
    """Pipeline's own scheduler: recycle idle opportunities every `recycle_tick_seconds`."""

    async def loop(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                while await asyncio.to_thread(app.recycle_idle, clock.now(), settings.rules()):
                    pass  # a full page was recycled: look again at once
            except Exception:
                log.exception("recycling failed; trying again at the next tick")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.recycle_tick_seconds)

    return loop


async def main(settings: Settings) -> None:
    setup_logging("pipeline", settings.log_level)
    pool = await open_schema(settings, SCHEMA, MIGRATIONS)
    app = await asyncio.to_thread(PipelineApp, settings.dsn(), SCHEMA)
    clock = SystemClock()
    relay = OutboxRelay("pipeline", app, route, settings, pool)
    leads = lead_events(app, settings)
    readiness = Readiness(settings, pool, [leads], relay)
    api = create_api(app, settings, pool, clock, lambda: readiness)
    loops = [relay.run, leads.run, recycling(app, settings, clock)]
    try:
        await serve(api, settings.pipeline_port, loops, settings.http_host)
    finally:
        app.close()
        await pool.close()


if __name__ == "__main__":
    run_service(main(Settings()))
