"""Wiring of the capture service: `python -m services.capture` or `dealstream capture`."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services.capture.api import create_api
from services.capture.app import MIGRATIONS, SCHEMA, CaptureApp
from services.capture.bus import partner_intake, route
from services.capture.intake_limits import RateLimiter
from services.capture.partners import PartnerSecrets
from shared.bus.relay import OutboxRelay
from shared.clock import Clock, SystemClock
from shared.logs import setup_logging
from shared.runtime import Loop, Readiness, open_schema, run_service, serve
from shared.settings import Settings

log = logging.getLogger(__name__)


def registration_expiry(app: CaptureApp, settings: Settings, clock: Clock) -> Loop:
    """Capture's scheduler: registrations past their end expire, an event each."""

    async def loop(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                while await asyncio.to_thread(app.expire_registrations, clock.now()):
                    pass
            except Exception:
                log.exception("registration expiry failed; trying again at the next tick")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.recycle_tick_seconds)

    return loop


async def main(settings: Settings) -> None:
    setup_logging("capture", settings.log_level)
    pool = await open_schema(settings, SCHEMA, MIGRATIONS)
    app = await asyncio.to_thread(CaptureApp, settings.dsn(), SCHEMA)
    clock = SystemClock()
    relay = OutboxRelay("capture", app, route, settings, pool)
    intake = partner_intake(app, settings, PartnerSecrets(pool), clock)
    readiness = Readiness(settings, pool, [intake], relay)
    limiter = RateLimiter(settings.intake_rate_per_minute, settings.intake_burst)
    api = create_api(app, settings, clock, lambda: readiness, limiter)
    loops = [relay.run, intake.run, registration_expiry(app, settings, clock)]
    try:
        await serve(api, settings.capture_port, loops, settings.http_host)
    finally:
        app.close()
        await pool.close()


if __name__ == "__main__":
    run_service(main(Settings()))
