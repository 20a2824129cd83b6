"""The partner directory: who may submit leads, with which secrets (a rotated secret stays valid
for an overlap window so partners can switch without losing messages)."""

from __future__ import annotations

import secrets
import time
from datetime import datetime, timedelta

import asyncpg

from shared.contracts.topics import PARTNER_ID_PATTERN

ROTATION_OVERLAP = timedelta(days=7)


class PartnerExists(ValueError):
    pass


def new_secret() -> str:
    return secrets.token_urlsafe(32)


async def add_partner(pool: asyncpg.Pool, partner_id: str, secret: str | None = None) -> str:
    if not PARTNER_ID_PATTERN.match(partner_id):
        raise ValueError(
            f"partner id {partner_id!r} must be 2-64 characters of a-z, 0-9, '_' or '-'"
        )
    secret = secret or new_secret()
    try:
        await pool.execute(
            "INSERT INTO partners (partner_id, secret) VALUES ($1, $2)", partner_id, secret
        )
    except asyncpg.UniqueViolationError:
        raise PartnerExists(f"partner {partner_id} already exists") from None
    return secret


async def rotate_partner(pool: asyncpg.Pool, partner_id: str, now: datetime) -> str:
    secret = new_secret()
    done = await pool.execute(
        "UPDATE partners SET previous_secret = secret, previous_valid_until = $3, secret = $2"
        " WHERE partner_id = $1",
        partner_id,
        secret,
        now + ROTATION_OVERLAP,
    )
    if done.endswith(" 0"):
        raise KeyError(partner_id)
    return secret


async def list_partners(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return list(
        await pool.fetch(
            "SELECT partner_id, created_at, previous_valid_until FROM partners ORDER BY partner_id"
        )
    )


class PartnerSecrets:
    """Secrets by partner, cached for a few seconds; a message of an unknown partner, or signed
    with a secret not known, has them read again (`reloaded`) before it is refused, so a partner
    added or a secret rotated a moment ago is known."""

    def __init__(self, pool: asyncpg.Pool, ttl: float = 5.0) -> None:
        self.pool = pool
        self.ttl = ttl
        self._secrets: dict[str, list[str]] = {}
        self._loaded_at = float("-inf")

    async def current(self, now: datetime) -> dict[str, list[str]]:
        """The secrets, read at most `ttl` seconds ago."""
        return await self.reloaded(now, time.monotonic() - self.ttl)

    async def reloaded(self, now: datetime, since: float) -> dict[str, list[str]]:
        """The secrets as stored at `since` (a `time.monotonic()`) or later: read again unless a
        read began after it. Given the moment a fetch arrived, a partner registered or a secret
        rotated before its messages were sent is seen, and a fetch reads them once at most."""
        if self._loaded_at < since:
            await self._load(now)
        return self._secrets

    async def _load(self, now: datetime) -> None:
        began = time.monotonic()
        rows = await self.pool.fetch(
            "SELECT partner_id, secret, previous_secret, previous_valid_until FROM partners"
        )
        loaded: dict[str, list[str]] = {}
        for row in rows:
            valid = [row["secret"]]
            if (
                row["previous_secret"]
                and row["previous_valid_until"]
                and row["previous_valid_until"] > now
            ):
                valid.append(row["previous_secret"])
            loaded[row["partner_id"]] = valid
        self._secrets = loaded
        self._loaded_at = began
