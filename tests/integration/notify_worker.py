"""One notify replica as its own process, for the replica test: `python -m
tests.integration.notify_worker <schema> <now> <name>` ticks once as of <now> against <schema>
(connection settings from DEALSTREAM_* variables) and prints its counts as JSON."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime

from services.notify.app import Notifier
from services.notify.timers import MIGRATIONS
from shared.bus.kafka import make_producer
from shared.clock import FixedClock
from shared.runtime import open_schema
from shared.settings import Settings
from tests.notify_support import RULES


async def main(schema: str, now: datetime, name: str) -> None:
    settings = Settings()
    pool = await open_schema(settings, schema, MIGRATIONS)
    producer = make_producer(settings, linger_ms=5)
    await producer.start()
    try:
        done = await Notifier(pool, settings, producer, name, RULES).tick(FixedClock(now))
    finally:
        await producer.stop()
        await pool.close()
    print(json.dumps(done))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], datetime.fromisoformat(sys.argv[2]), sys.argv[3]))
