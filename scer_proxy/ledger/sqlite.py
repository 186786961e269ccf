"""The durable ledger of request records: SQLite in WAL mode behind one writer task.

``SqliteLedger`` is the facade callers use; the jobs are modules of this package: ``schema`` (tables,
rollup triggers, migrations, connections, the tenant salt), ``writer`` (the pending map, batched writes,
backoff, retention), ``reads`` (lookups merged with records not yet written) and ``aggregate`` (the
summary and the ``/metrics`` rows in SQL from the hourly rollup).

A record holds ids, times, model, upstream, tenant (a salted hash or the named tenant), tokens,
energy, carbon, intensity and source, status and flags: never prompt or completion text, never a key.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from scer_proxy.carbon.records import Record
from scer_proxy.ledger import reads
from scer_proxy.ledger.aggregate import Aggregator
from scer_proxy.ledger.schema import (
    COUNT,
    SCHEMA_VERSION,
    CorruptDatabase,
    LedgerError,
    check_directory,
    log,
    move_aside,
    open_readers,
    restore_salt,
    tenant_salt,
)
from scer_proxy.ledger.writer import Writer

__all__ = ["LedgerError", "SqliteLedger", "tenant_salt"]


class SqliteLedger:
    """Request records in SQLite (WAL, ``synchronous=NORMAL``), written in batches by one writer task.

    ``flush_interval_s``: seconds between flushes (a kill -9 loses at most the records of the last one).
    ``max_pending``: records held in memory while the database cannot be written (oldest dropped beyond).
    ``retention_days``: records started longer ago are deleted (checked after the first flush and every
    ``retention_check_s`` seconds). ``path`` ``":memory:"`` uses a temporary file removed at close.
    ``read_only`` opens for reading only (``scer-proxy report``): no writer, no migrations.
    ``on_corrupt``: a file that is not a database, or a damaged one, at open: ``"refuse"`` raises
    ``LedgerError``; ``"move-aside"`` renames it ``<path>.corrupt-<UTC time>`` and starts a new one.
    ``before_write``: see ``Writer``.
    ``on_put``: called with every record put, after it is queued (``/metrics`` counts them); an error in
    it is logged, never raised to the caller, and the record is kept.
    """

    kind = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        flush_interval_s: float = 0.2,
        max_pending: int = 100_000,
        retention_days: float = 90.0,
        retention_check_s: float = 3600.0,
        read_only: bool = False,
        on_corrupt: str = "refuse",
        before_write: Callable[[sqlite3.Connection], None] | None = None,
        on_put: Callable[[Record], None] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self._on_put = on_put
        self.read_only = read_only
        self.on_corrupt = on_corrupt
        self.tenant_salt = b""
        self._tmpdir: str | None = None
        self._db_path = self.path
        self._writer = Writer(
            self.path,
            self.path,
            flush_interval_s=flush_interval_s,
            max_pending=max_pending,
            retention_days=retention_days,
            retention_check_s=retention_check_s,
            before_write=before_write,
            on_connect=self._open_readers_once,
            on_gone=self._database_gone,
        )
        self._reader: sqlite3.Connection | None = None  # lookups (get, recent), on any thread
        self._reader_lock = threading.Lock()  # one read at a time on it (its transactions are explicit)
        self._aggregator = Aggregator()  # summaries, on a worker thread

    @property
    def flush_interval_s(self) -> float:
        return self._writer.flush_interval_s

    @property
    def max_pending(self) -> int:
        return self._writer.max_pending

    @property
    def dropped(self) -> int:
        """Records dropped because the database could not be written and memory was full."""
        return self._writer.dropped

    # ---------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        """Open (creating and migrating as needed) and start the writer task.

        Raises ``LedgerError`` when the file cannot be opened at all (a missing directory, not a
        database, a schema newer than this code); a database that is readable but cannot be written
        (read-only, full) is opened degraded and retried by the writer.
        """
        if self.path == ":memory:":
            self._tmpdir = tempfile.mkdtemp(prefix="scer-ledger-")
            self._db_path = self._writer.db_path = os.path.join(self._tmpdir, "ledger.db")
        if self.read_only:
            await asyncio.to_thread(self._open_readers)
            return
        await asyncio.to_thread(self._prepare)
        try:
            await self._writer.connect()
        except CorruptDatabase as exc:
            if self.on_corrupt != "move-aside":
                raise
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            aside = await asyncio.to_thread(move_aside, self._db_path, stamp)
            log.warning(
                "ledger_corrupt_moved_aside", path=self.path, moved_to=aside, error=str(exc.__cause__)
            )
            await self._writer.connect()
        if self._writer.connected:
            await asyncio.to_thread(self._open_readers)
        self._writer.start()

    def _prepare(self) -> None:
        """Check the database's directory and read (or create) the tenant salt beside it."""
        check_directory(self.path, self._db_path)
        if not self.tenant_salt:
            self.tenant_salt = tenant_salt(self.path)

    def _open_readers(self) -> None:
        reader, aggregator = open_readers(self.path, self._db_path, read_only=self.read_only)
        if self.read_only:
            try:
                (records,) = reader.execute(COUNT).fetchone()
            except sqlite3.DatabaseError as exc:
                raise LedgerError(f"cannot read ledger database {self.path!r}: {exc}") from exc
            self._writer.records = int(records)
        self._reader, self._aggregator.conn = reader, aggregator

    def _open_readers_once(self) -> None:
        if self._reader is None:
            self._open_readers()

    async def _database_gone(self) -> None:
        """The database file was deleted or replaced: close the readers (under their locks, after any read
        running on a worker thread), to be opened again on the new file (until then reads see
        what is in memory only), and write the tenant salt back if it went with the file."""
        await asyncio.to_thread(self._close_stale_readers)
        if self.path != ":memory:" and await asyncio.to_thread(restore_salt, self.path, self.tenant_salt):
            log.warning("ledger_salt_restored", path=f"{self.path}.salt")

    def _close_stale_readers(self) -> None:
        """Close both readers once no read holds them (reads run on worker threads under their locks)."""
        with self._reader_lock, self._aggregator.lock:
            reader, self._reader = self._reader, None
            conn, self._aggregator.conn = self._aggregator.conn, None
        for old in (reader, conn):
            if old is not None:
                old.close()

    async def close(self) -> None:
        """Stop the writer after a final flush (retried briefly on a fault), then close the database."""
        await self._writer.close()
        await asyncio.to_thread(self._close_readers)

    def _close_readers(self) -> None:
        with self._reader_lock, self._aggregator.lock:  # after any read still running on a worker thread
            for conn in (self._reader, self._aggregator.conn):
                if conn is not None:
                    conn.close()
            self._reader = self._aggregator.conn = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # ---------------------------------------------------------------- writing

    def put(self, record: Record) -> None:
        """Insert or replace (a settled figure replaces the response-time one); only enqueues, never blocks."""
        self._writer.put(record)
        if self._on_put is not None:
            try:
                self._on_put(record)
            except Exception:
                log.exception("ledger_on_put_failed", request_id=record.request_id)

    async def flush(self) -> bool:
        """Write everything put so far now; True when the database has it (False while it is faulted)."""
        return await self._writer.flush()

    # ---------------------------------------------------------------- reading

    def overlay(self) -> dict[str, Record]:
        """The records not yet in the database (newest figure of each, oldest first). Take it on the event
        loop, where records are put, and hand it to a read that runs on a worker thread."""
        return self._writer.overlay()

    def unwritten(self, request_id: str) -> Record | None:
        """The record's figure not yet in the database, or None (on the event loop)."""
        return self._writer.lookup(request_id)

    def stored(self, request_id: str) -> Record | None:
        """The record's figure in the database (one indexed lookup), or None; blocking, any thread."""
        with self._reader_lock:
            if self._reader is None:
                return None
            return reads.get(self._reader, request_id)

    def get(self, request_id: str) -> Record | None:
        """The record with this id (pending first, then the database: one indexed lookup), or None.
        Blocking, on the event loop (a worker thread uses ``unwritten`` on the loop, then ``stored``)."""
        return self.unwritten(request_id) or self.stored(request_id)

    def recent(self, limit: int, overlay: dict[str, Record] | None = None) -> list[Record]:
        """Up to ``limit`` records, most recently put first (one indexed range read). Blocking; from a
        worker thread pass ``overlay`` as taken on the loop (``overlay()``)."""
        unwritten = self._writer.overlay() if overlay is None else overlay
        with self._reader_lock:
            return reads.recent(self._reader, unwritten, limit)

    def __len__(self) -> int:
        """Records in the database (``pending`` ones not counted until written)."""
        return self._writer.records

    @property
    def pending(self) -> int:
        """Records put but not yet in the database."""
        return self._writer.unwritten

    def __iter__(self) -> Iterator[Record]:
        """Every record (database then pending, newest figure of each): for exports, not hot paths."""
        return reads.every(self._aggregator.conn, self._aggregator.lock, self._writer.overlay())

    def health(self) -> dict[str, Any]:
        """``/scer/health``'s ledger object: kind, path, records (in the database), pending, dropped,
        last_error (None when the last flush succeeded; the writer task's failure if it stopped),
        healthy, last_flush_age_ms, recreated (times the database file was found deleted or replaced and
        made anew; healthy is false from then on) and recreated_at."""
        writer = self._writer
        return {
            "kind": self.kind,
            "path": self.path,
            "records": writer.records,
            "pending": writer.unwritten,
            "dropped": writer.dropped,
            "last_error": writer.stopped or writer.last_error,
            "healthy": writer.last_error is None
            and writer.running
            and writer.recreated == 0
            and (writer.connected or self.read_only),
            "recreated": writer.recreated,
            "recreated_at": writer.recreated_at,
            "last_flush_age_ms": round((time.monotonic() - writer.last_flush) * 1000.0, 1),
            "flush_interval_ms": writer.flush_interval_s * 1000.0,
            "schema_version": SCHEMA_VERSION,
        }

    # ---------------------------------------------------------------- aggregation

    def summary_sync(
        self,
        since_s: float | None = None,
        model: str | None = None,
        tenant: str | None = None,
        *,
        now: float | None = None,
        grades: dict[str, str] | None = None,
        categories: dict[str, str] | None = None,
        overlay: dict[str, Record] | None = None,
    ) -> dict[str, Any]:
        """The summary (blocking; see ``summary``)."""
        end = time.time() if now is None else now
        return self._aggregator.summary(
            self._writer.overlay() if overlay is None else overlay,
            start=None if since_s is None else end - since_s,
            end=end,
            model=model,
            tenant=tenant,
            grades=grades,
            categories=categories,
        )

    async def summary(
        self,
        since_s: float | None = None,
        model: str | None = None,
        tenant: str | None = None,
        *,
        now: float | None = None,
        grades: dict[str, str] | None = None,
        categories: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """``window``, ``totals``, ``models``, ``tenants`` over finished records started in the last
        ``since_s`` seconds (all time when None), optionally one model or tenant; the keys of
        ``scer_proxy.summary.summarize``. Energy in joules, carbon in grams CO2e. Runs on a worker thread."""
        overlay = (
            self._writer.overlay()
        )  # taken on the loop, before the snapshot, so no record falls in between
        return await asyncio.to_thread(
            self.summary_sync,
            since_s,
            model,
            tenant,
            now=now,
            grades=grades,
            categories=categories,
            overlay=overlay,
        )

    def metrics_rows_sync(self, overlay: dict[str, Record] | None = None) -> list[dict[str, Any]]:
        """All-time sums per model x status x energy source (blocking; see ``metrics_rows``)."""
        return self._aggregator.metrics_rows(self._writer.overlay() if overlay is None else overlay)

    async def metrics_rows(self) -> list[dict[str, Any]]:
        """For ``/metrics``: one dict per model x status x energy source with the summed quantities of
        ``scer_proxy.carbon.totals`` (records, tokens, energy_j in joules, carbon_*_g in grams) over every
        finished record kept (retention applies)."""
        overlay = self._writer.overlay()
        return await asyncio.to_thread(self.metrics_rows_sync, overlay)
