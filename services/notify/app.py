"""Notify's due work in one call, as of an injected `now`: fire due timers and digests into
notifications, then deliver what is pending. The scheduler runs it every `notify_tick_seconds`;
`dealstream notify tick --now <time>` runs it once (ops backfills and tests)."""

from __future__ import annotations

from datetime import datetime

import asyncpg
from aiokafka import AIOKafkaProducer

from services.notify.delivery import Dispatcher
from services.notify.firing import Channels, fire_due_timers, issue_digests
from shared.clock import Clock
from shared.settings import Rules, Settings

PAGE = 2000


class Notifier:
    def __init__(self, pool: asyncpg.Pool, settings: Settings, producer: AIOKafkaProducer,
                 worker: str | None = None, rules: Rules | None = None) -> None:  # fmt: skip
        self.pool = pool
        self.settings = settings
        self.producer = producer
        self.worker = worker
        self.rules = (lambda: rules) if rules is not None else settings.rules

    async def issue(self, now: datetime) -> dict[str, int]:
        """Fire every timer due at `now` and this week's digests; counts of what was done."""
        rules, channels = self.rules(), Channels.of(self.settings)
        fired = issued = 0
        while True:
            page, new = await fire_due_timers(self.pool, now, rules, channels, PAGE)
            fired, issued = fired + page, issued + new
            if page < PAGE:
                break
        digests = await issue_digests(self.pool, now, rules, channels)
        return {"timers_fired": fired, "notifications": issued + digests, "digests": digests}

    async def deliver(self, clock: Clock) -> dict[str, int]:
        """Deliver the pending deliveries, a page at a time, until none is left or a page sent
        nothing (the broker is down: the next tick tries again)."""
        claimed = 0
        async with Dispatcher(self.pool, self.settings, self.producer, clock, self.worker) as d:
            while True:
                before = d.sent
                page = await d.dispatch(PAGE)
                claimed += page
                if page == 0 or d.sent == before:
                    break
            return {"deliveries": claimed, "sent": d.sent}

    async def tick(self, clock: Clock) -> dict[str, int]:
        return {**await self.issue(clock.now()), **await self.deliver(clock)}
