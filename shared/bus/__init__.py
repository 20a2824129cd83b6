"""The bus: broker factory, outbox relay, idempotent consumers."""
