"""Schema migrations: each service owns one schema and an ordered list of SQL steps; applied
steps are recorded in `<schema>.schema_version`, under an advisory lock so replicas can race."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import asyncpg

Migration = tuple[int, str]


class SchemaTooNew(RuntimeError):
    pass


async def migrate(conn: asyncpg.Connection, schema: str, steps: Sequence[Migration]) -> int:
    lock_key = zlib.crc32(f"dealstream-migrate-{schema}".encode())
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key)
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            f'CREATE TABLE IF NOT EXISTS "{schema}".schema_version ('
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        current = await conn.fetchval(
            f'SELECT coalesce(max(version), 0) FROM "{schema}".schema_version'
        )
        known = max((v for v, _ in steps), default=0)
        if current > known:
            raise SchemaTooNew(f"schema {schema} is at version {current}; this code knows {known}")
        for version, sql in sorted(steps):
            if version <= current:
                continue
            await conn.execute(f'SET LOCAL search_path TO "{schema}"')
            await conn.execute(sql)
            await conn.execute(
                f'INSERT INTO "{schema}".schema_version (version) VALUES ($1)', version
            )
            current = version
        return int(current)


def event_store(version: int, name: str) -> Migration:
    """The event store of the `EventStoreApp` called `name`: its events, numbered in the order
    of the notification log, and its tracking positions, laid out as eventsourcing 9.5 lays
    them out. This step alone makes them (the library is told not to: `CREATE_TABLE=n`); IF
    NOT EXISTS: stores that the library made before this step existed are kept as they are."""
    options = (
        "WITH (autovacuum_enabled = true, autovacuum_vacuum_threshold = 100000000,"
        " autovacuum_vacuum_scale_factor = 0.5, autovacuum_analyze_threshold = 1000,"
        " autovacuum_analyze_scale_factor = 0.01)"
    )
    return (
        version,
        f"""
        CREATE TABLE IF NOT EXISTS {name}_events (
            originator_id uuid NOT NULL,
            originator_version bigint NOT NULL,
            topic text,
            state bytea,
            notification_id bigserial,
            PRIMARY KEY (originator_id, originator_version)
        ) {options};
        CREATE UNIQUE INDEX IF NOT EXISTS {name}_events_notification_id_idx
            ON {name}_events (notification_id ASC);
        CREATE TABLE IF NOT EXISTS {name}_tracking (
            application_name text,
            notification_id bigint,
            PRIMARY KEY (application_name)
        ) {options};
        """,
    )


# Tables every service with a relay or consumers needs, in its own schema.
BUS_TABLES: Migration = (
    1,
    """
    CREATE TABLE relay_position (
        relay text PRIMARY KEY,
        cluster_id text NOT NULL,
        position bigint NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    """,
)

READ_MODEL_TABLES: Migration = (
    2,
    """
    CREATE TABLE stream_position (
        stream_id uuid PRIMARY KEY,
        version integer NOT NULL
    );
    CREATE TABLE stream_gap (
        stream_id uuid NOT NULL,
        expected_version integer NOT NULL,
        received_version integer NOT NULL,
        event_type text NOT NULL,
        seen_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (stream_id, received_version)
    );
    """,
)
