"""The store: event-store application base, asyncpg pools, schema migrations."""
