"""Reads of stored records merged with the overlay of records not yet written.

The overlay (``Writer.overlay``: request id -> newest unwritten figure, oldest put first) wins over the
database's figure of the same id; a record only in the overlay is newer than every stored one.
"""

from __future__ import annotations

import itertools
import sqlite3
import threading
from collections.abc import Iterator, Sequence

from scer_proxy.carbon.records import Record
from scer_proxy.ledger.schema import SELECT, from_row

_CHUNK = 500  # ids per ``IN (...)`` query, well under SQLite's limit on parameters


def get(conn: sqlite3.Connection, request_id: str) -> Record | None:
    """The stored record with this id (one indexed lookup), or None."""
    row = conn.execute(f"{SELECT} WHERE request_id = ?", (request_id,)).fetchone()
    return from_row(row) if row is not None else None


def recent(conn: sqlite3.Connection | None, overlay: dict[str, Record], limit: int) -> list[Record]:
    """Up to ``limit`` records, most recently put first (one indexed range read); a stored record
    replaced in the overlay keeps its place with its new figure."""
    tail = list(itertools.islice(reversed(overlay.values()), limit))
    if conn is None:
        return tail
    conn.execute("BEGIN")
    try:
        in_db = ids_in_db(conn, [r.request_id for r in tail])
        fresh = [r for r in tail if r.request_id not in in_db]
        rows = conn.execute(f"{SELECT} ORDER BY seq DESC LIMIT ?", (limit - len(fresh),)).fetchall()
    finally:
        conn.execute("COMMIT")
    stored_tail = [from_row(row) for row in rows]
    return fresh + [overlay.get(r.request_id, r) for r in stored_tail]


def every(
    conn: sqlite3.Connection | None, lock: threading.Lock, overlay: dict[str, Record]
) -> Iterator[Record]:
    """Every record (stored in insertion order, then the overlay's new ones; newest figure of each)."""
    rest = dict(overlay)
    if conn is not None:
        with lock:
            rows = conn.execute(f"{SELECT} ORDER BY seq").fetchall()
        for row in rows:
            record = from_row(row)
            yield rest.pop(record.request_id, record)
    yield from rest.values()


def _chunks(ids: Sequence[str]) -> Iterator[Sequence[str]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i : i + _CHUNK]


def ids_in_db(conn: sqlite3.Connection, ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` are stored."""
    found: set[str] = set()
    for chunk in _chunks(ids):
        marks = ",".join("?" * len(chunk))
        found.update(
            row[0]
            for row in conn.execute(f"SELECT request_id FROM requests WHERE request_id IN ({marks})", chunk)
        )
    return found


def stored(conn: sqlite3.Connection, ids: Sequence[str]) -> list[Record]:
    """The stored figures of those of ``ids`` that are stored."""
    out: list[Record] = []
    for chunk in _chunks(ids):
        marks = ",".join("?" * len(chunk))
        out.extend(from_row(row) for row in conn.execute(f"{SELECT} WHERE request_id IN ({marks})", chunk))
    return out
