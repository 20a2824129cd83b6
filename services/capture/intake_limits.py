"""What keeps the public web-form intake usable: a token bucket per client, and the honeypot
field bots fill in and people never see."""

from __future__ import annotations

import time
from collections.abc import Callable

HONEYPOT_FIELD = "website"  # rendered hidden in the form; a person leaves it empty


class RateLimiter:
    """`per_minute` requests per client on average, up to `burst` at once. Memory stays bounded:
    idle clients are forgotten once many are tracked."""

    def __init__(
        self,
        per_minute: int,
        burst: int,
        now: Callable[[], float] = time.monotonic,
        max_clients: int = 10_000,
    ) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.now = now
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)

    def retry_after(self, client: str) -> float | None:
        """Take a token for `client`; None if allowed, else seconds until the next token."""
        now = self.now()
        tokens, at = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            return (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens - 1.0, now)
        if len(self._buckets) > self.max_clients:
            self._forget_idle(now)
        return None

    def _forget_idle(self, now: float) -> None:
        full = self.burst / self.rate  # after this long a bucket is full again: forgettable
        for client, (_, at) in list(self._buckets.items()):
            if now - at > full:
                del self._buckets[client]
