"""Wiring of the notify service: `python -m services.notify` or `dealstream notify`."""

from __future__ import annotations

from services.notify.api import create_api
from services.notify.bus import opportunity_events
from services.notify.timers import MIGRATIONS, SCHEMA
from shared.logs import setup_logging
from shared.runtime import Readiness, open_schema, run_service, serve
from shared.settings import Settings


async def main(settings: Settings) -> None:
    setup_logging("notify", settings.log_level)
    pool = await open_schema(settings, SCHEMA, MIGRATIONS)
    events = opportunity_events(pool, settings)
    readiness = Readiness(settings, pool, [events])
    api = create_api(settings, pool, lambda: readiness)
    try:
        await serve(api, settings.notify_port, [events.run], settings.http_host)
    finally:
        await pool.close()


if __name__ == "__main__":
    run_service(main(Settings()))
