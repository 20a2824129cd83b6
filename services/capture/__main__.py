"""Wiring of the capture service: `python -m services.capture` or `dealstream capture`."""

from __future__ import annotations

import asyncio

from services.capture.api import create_api
from services.capture.app import MIGRATIONS, SCHEMA, CaptureApp
from services.capture.bus import customer_deals, partner_intake, route
from services.capture.intake_limits import RateLimiter
from services.capture.partners import PartnerSecrets
from shared.bus.relay_process import RelaySpec, relay_for
from shared.clock import SystemClock
from shared.logs import setup_logging
from shared.runtime import Readiness, open_schema, run_service, scheduled, serve
from shared.settings import Settings
from shared.tracing import setup_tracing


async def main(settings: Settings) -> None:
    setup_logging("capture", settings.log_level)
    setup_tracing("capture", settings.otel)
    pool = await open_schema(settings, SCHEMA, MIGRATIONS)
    app = await asyncio.to_thread(CaptureApp, settings.dsn(), SCHEMA)
    clock = SystemClock()
    relay = relay_for(RelaySpec("capture", CaptureApp, SCHEMA, route), settings, app, pool)
    intake = partner_intake(app, settings, PartnerSecrets(pool), clock)
    deals = customer_deals(pool, settings)
    readiness = Readiness(settings, pool, [intake, deals], relay)
    limiter = RateLimiter(settings.intake_rate_per_minute, settings.intake_burst)
    api = create_api(app, settings, clock, lambda: readiness, limiter)
    expiry = scheduled(
        "registration expiry",
        lambda: app.expire_registrations(clock.now()),
        settings.recycle_tick_seconds,
    )
    loops = [relay.run, intake.run, deals.run, expiry]
    try:
        await serve(api, settings.capture_port, loops, settings.http_host)
    finally:
        app.close()
        await pool.close()


if __name__ == "__main__":
    run_service(main(Settings()))
