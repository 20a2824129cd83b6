"""PostgreSQL connection settings: asyncpg pools per service schema, and the environment the
`eventsourcing` library reads for the same database."""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qs, unquote, urlparse

import asyncpg


def eventsourcing_env(dsn: str, schema: str, pool_size: int = 5) -> dict[str, str]:
    """The `eventsourcing` PostgreSQL settings for a `postgresql://` URL (unix socket hosts
    given as `?host=/path` included)."""
    url = urlparse(dsn)
    query = parse_qs(url.query)
    host = query.get("host", [url.hostname or "localhost"])[0]
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": (url.path.lstrip("/") or "postgres"),
        "POSTGRES_HOST": host,
        "POSTGRES_PORT": str(url.port or query.get("port", ["5432"])[0]),
        "POSTGRES_USER": unquote(url.username or "postgres"),
        "POSTGRES_PASSWORD": unquote(url.password or ""),
        "POSTGRES_SCHEMA": schema,
        "POSTGRES_POOL_SIZE": str(pool_size),
        "POSTGRES_MAX_OVERFLOW": "10",
        "POSTGRES_CONNECT_TIMEOUT": "10",
        "POSTGRES_PRE_PING": "n",  # a dead connection fails the batch, which is retried
        "POSTGRES_LOCK_TIMEOUT": "10",
        "SINGLE_ROW_TRACKING": "y",
        "CREATE_TABLE": "n",  # the tables are the migrations' (shared.store.migrations.event_store)
        "PROCESS_RECORDER_TOPIC": "shared.store.recorder:BatchProcessRecorder",
    }


async def create_pool(
    dsn: str,
    schema: str,
    min_size: int = 1,
    max_size: int = 5,
    server: Mapping[str, str] | None = None,
) -> asyncpg.Pool:
    """A pool on `schema`; `server` adds session settings (reporting's `work_mem`, say)."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        server_settings={
            "search_path": f"{schema},public",
            "application_name": f"dealstream-{schema}",
            **(server or {}),
        },
    )
    assert pool is not None
    return pool
