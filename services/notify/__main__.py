"""Wiring of the notify service: `python -m services.notify` or `dealstream notify`."""

from __future__ import annotations

import uuid

from services.notify.api import create_api
from services.notify.app import Notifier
from services.notify.bus import opportunity_events
from services.notify.timers import MIGRATIONS, SCHEMA
from shared.bus.kafka import make_producer
from shared.clock import SystemClock
from shared.logs import setup_logging
from shared.runtime import Readiness, open_schema, periodic, run_service, serve
from shared.settings import Settings
from shared.tracing import setup_tracing


async def main(settings: Settings) -> None:
    setup_logging("notify", settings.log_level)
    setup_tracing("notify", settings.otel)
    pool = await open_schema(settings, SCHEMA, MIGRATIONS)
    producer = make_producer(settings, linger_ms=5)
    await producer.start()
    events = opportunity_events(pool, settings)
    readiness = Readiness(settings, pool, [events])
    api = create_api(settings, pool, lambda: readiness)
    notifier = Notifier(pool, settings, producer, f"notify-{uuid.uuid4().hex[:8]}")
    clock = SystemClock()
    due_work = periodic("notify tick", lambda: notifier.tick(clock), settings.notify_tick_seconds)
    try:
        await serve(api, settings.notify_port, [events.run, due_work], settings.http_host)
    finally:
        await producer.stop()
        await pool.close()


if __name__ == "__main__":
    run_service(main(Settings()))
