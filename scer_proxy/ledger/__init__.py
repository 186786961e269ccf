"""Durable per-request records in SQLite (WAL, one writer, batched)."""
