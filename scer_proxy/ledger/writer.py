"""The ledger's one writer: records put in memory, written in batches by a task, old ones deleted.

``put`` never blocks: it puts the record in a pending map keyed by request id, so the settled figure
replaces the response-time one before it is ever written. The task writes the map every
``flush_interval_s`` in one transaction (``executemany`` UPSERT) on a worker thread, so the event loop
never waits on the disk. Until a batch is committed its records are the ``overlay`` that reads merge in.

Faults of the medium (a full disk, a read-only file): records stay in memory up to ``max_pending``
(oldest dropped beyond it, counted in ``dropped``), the write is retried with backoff, and
``last_error`` holds the fault until a write succeeds again.

The database file deleted or replaced while serving (the open connection would go on writing to the
unlinked file, and every later record would be lost): each write checks the file at the path is still
the one opened, before and after its transaction. If not, the connection is closed, a new database is
created with its schema, and the batch is written there; ``recreated`` counts it, and health stays
degraded (the records of the lost file are gone) until a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable

from scer_proxy.carbon.records import Record
from scer_proxy.ledger.schema import (
    COUNT,
    UPSERT,
    LedgerError,
    file_identity,
    log,
    open_writer,
    remove_orphans,
    retryable,
    to_row,
)

COUNT_EVERY_S = 2.0  # how often the writer recounts the records in the database
RETENTION_CHUNK = 5000  # records deleted per transaction, so flushes go on in between


class DatabaseGone(Exception):
    """The file at the database's path is not the one the connection opened (deleted, or replaced)."""


class Writer:
    """The pending records and the task that writes them (see the module's docstring).

    ``before_write`` is called on the writer's connection, under its lock, before each batch's
    transaction (tests inject faults with it: a PRAGMA that fills the disk or makes the file read-only).
    ``on_connect`` runs on a worker thread once a connection that failed at open has been made.
    ``on_gone`` runs on the loop when the database file is found deleted or replaced, before the writer
    closes its connection: the readers must close theirs first (see ``_recreate``).
    """

    def __init__(
        self,
        name: str,
        db_path: str,
        *,
        flush_interval_s: float,
        max_pending: int,
        retention_days: float,
        retention_check_s: float,
        before_write: Callable[[sqlite3.Connection], None] | None = None,
        on_connect: Callable[[], None] | None = None,
        on_gone: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.name = name
        self.db_path = db_path
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self.retention_days = retention_days
        self.retention_check_s = retention_check_s
        self.before_write = before_write
        self.on_connect = on_connect
        self.on_gone = on_gone
        self.recreated = 0  # times the database file was found deleted or replaced, and made anew
        self.recreated_at: float | None = None  # Unix time of the last
        self.stopped: str | None = None  # why the task ended other than by close (a bug): health shows it
        self.dropped = 0  # records dropped because the database could not be written and memory was full
        self.records = 0  # records in the database, as last counted
        self.last_error: str | None = None
        self.last_flush = time.monotonic()
        self._pending: dict[str, Record] = {}
        self._flushing: dict[str, Record] = {}
        self._conn: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file the connection opened
        self._lock = threading.Lock()
        self._counted_at = -math.inf
        self._failures = 0
        self._next_retention = 0.0
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._waiters: list[asyncio.Future[bool]] = []
        self._closing = False

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def running(self) -> bool:
        """Whether the task that writes is alive (or was never started: a read-only ledger)."""
        return self.stopped is None

    @property
    def unwritten(self) -> int:
        """Records put but not yet in the database."""
        return len(self._pending) + len(self._flushing)

    def lookup(self, request_id: str) -> Record | None:
        """The newest unwritten figure of a record, or None."""
        return self._pending.get(request_id) or self._flushing.get(request_id)

    def overlay(self) -> dict[str, Record]:
        """Records not yet in the database (being written, then pending; newest figure wins), oldest first."""
        if not self._flushing:
            return dict(self._pending)
        overlay = dict(self._flushing)
        overlay.update(self._pending)
        return overlay

    # ---------------------------------------------------------------- lifecycle

    async def connect(self) -> None:
        """Open the connection; a fault of the medium leaves it to the task's retries (LedgerError for
        anything else)."""
        try:
            await asyncio.to_thread(self._connect)
        except sqlite3.OperationalError as exc:
            if not retryable(exc):
                raise LedgerError(f"cannot open ledger database {self.name!r}: {exc}") from exc
            self._fault(exc)

    def _connect(self) -> None:
        self._conn, self.records = open_writer(self.name, self.db_path)
        self._identity = file_identity(self.db_path)

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="ledger-writer")
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """The task ended: by close, or by an error nothing caught (then every later record would stay in
        memory unwritten: health must say so). Whoever waits on a flush is answered: not written."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(False)
        self._waiters = []
        if task.cancelled() or task.exception() is None:
            if not self._closing:
                self.stopped = "the writer task ended"
            return
        exc = task.exception()
        self.stopped = f"the writer task failed: {type(exc).__name__}: {exc}"
        log.error("ledger_writer_stopped", path=self.name, error=self.stopped, pending=len(self._pending))

    async def close(self) -> None:
        """Stop the task after a final write (retried briefly on a fault), then close the connection.
        A task that died (see ``_ended``) left its records: they get one write here."""
        self._closing = True
        task, self._task = self._task, None
        if task is not None and not task.done() and self._wake is not None:
            self._wake.set()
            await task
        elif task is not None and self._pending and not await self._flush_once():
            log.error(
                "ledger_lost_on_close", path=self.name, records=len(self._pending), last_error=self.last_error
            )
        if self._conn is not None:
            await asyncio.to_thread(self._conn.close)
            self._conn = None

    # ---------------------------------------------------------------- writing

    def put(self, record: Record) -> None:
        """Insert or replace (a settled figure replaces the response-time one); only enqueues, never blocks."""
        pending = self._pending
        if record.request_id in pending:
            pending[record.request_id] = record
            return
        pending[record.request_id] = record
        if len(pending) > self.max_pending:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        pending = self._pending
        excess = len(pending) - self.max_pending
        if excess <= 0:
            return
        for request_id in list(itertools.islice(pending, excess)):
            del pending[request_id]
        if self.dropped == 0:
            log.error(
                "ledger_dropping_records",
                path=self.name,
                max_pending=self.max_pending,
                last_error=self.last_error,
            )
        self.dropped += excess

    async def flush(self) -> bool:
        """Write everything put so far now; True when the database has it (False while it is faulted)."""
        if self._task is None or self._wake is None or self._task.done():
            return not self._pending
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._wake.set()
        return await future

    def _delay_s(self) -> float:
        if self._failures == 0:
            return self.flush_interval_s
        return min(5.0, self.flush_interval_s * 2.0 ** min(self._failures, 10))

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            if not self._closing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._delay_s())
            self._wake.clear()
            waiters, self._waiters = self._waiters, []
            ok = await self._flush_once()
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(ok)
            if self._closing:
                if ok or self._failures >= 3:
                    if not ok and self._pending:
                        log.error(
                            "ledger_lost_on_close",
                            path=self.name,
                            records=len(self._pending),
                            last_error=self.last_error,
                        )
                    return
                await asyncio.sleep(min(1.0, self._delay_s()))
                continue
            if ok and time.monotonic() >= self._next_retention:
                await self._retention()

    def _unflush(self, batch: dict[str, Record]) -> None:
        """A batch that was not written goes back to pending (a figure put meanwhile wins)."""
        merged = dict(batch)
        merged.update(self._pending)
        self._pending, self._flushing = merged, {}

    async def _recreate(self, reason: str) -> None:
        """The database file is gone or replaced: close every connection to the old one (SQLite shares
        its ``-wal`` and ``-shm`` by name, so none may stay open beside a new file at the path), remove
        what is left of it, and let the next write create the new database with its schema."""
        self.recreated += 1
        self.recreated_at = time.time()
        log.error(
            "ledger_database_gone",
            path=self.name,
            reason=reason,
            pending=len(self._pending),
            action="recreated; the records it held are lost, those in memory are written anew",
        )
        if self.on_gone is not None:
            await self.on_gone()
        conn, self._conn = self._conn, None
        await asyncio.to_thread(self._close_gone, conn)

    def _close_gone(self, conn: sqlite3.Connection | None) -> None:
        with self._lock:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            remove_orphans(self.db_path)

    def _check_file(self) -> None:
        """Raise ``DatabaseGone`` unless the file at the path is the one the connection opened."""
        now = file_identity(self.db_path)
        if now != self._identity:
            raise DatabaseGone("database file deleted" if now is None else "database file replaced")

    async def _flush_once(self, *, recreate: bool = True) -> bool:
        if self._conn is None:
            try:
                await asyncio.to_thread(self._connect)
                if self.on_connect is not None:
                    await asyncio.to_thread(self.on_connect)
            except (sqlite3.OperationalError, LedgerError) as exc:
                self._fault(exc)
                return False
        batch = self._pending
        if not batch:
            self.last_flush = time.monotonic()
            return True
        self._pending, self._flushing = {}, batch
        try:
            records = await asyncio.to_thread(self._write, list(batch.values()))
        except DatabaseGone as exc:
            self._unflush(batch)
            if not recreate:
                self._fault(exc)
                return False
            await self._recreate(str(exc))
            return await self._flush_once(recreate=False)  # into the new database, now
        except Exception as exc:  # sqlite3.Error, and anything else: the batch is kept either way
            self._unflush(batch)
            self._drop_oldest()
            self._fault(exc)
            return False
        self._flushing = {}
        if records is not None:
            self.records = records
        self.last_flush = time.monotonic()
        if self._failures:
            log.info("ledger_recovered", path=self.name, after_failures=self._failures)
        self._failures, self.last_error = 0, None
        return not self._pending

    def _fault(self, exc: BaseException) -> None:
        if self._failures == 0:
            log.error("ledger_write_failed", path=self.name, error=str(exc), pending=len(self._pending))
        self._failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"

    def _write(self, records: list[Record]) -> int | None:
        """One transaction: upsert the batch (triggers keep the rollup). Returns the records in the
        database, counted at most every ``COUNT_EVERY_S`` (the count reads the whole rollup), else None."""
        with self._lock:
            conn = self._conn
            assert conn is not None
            if self.before_write is not None:
                self.before_write(conn)
            self._check_file()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(UPSERT, [to_row(r) for r in records])
                count = None
                now = time.monotonic()
                if now - self._counted_at >= COUNT_EVERY_S:
                    (count,) = conn.execute(COUNT).fetchone()
                    self._counted_at = now
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            self._check_file()  # deleted during the transaction: the batch went with the file
            return None if count is None else int(count)

    # ---------------------------------------------------------------- retention

    async def _retention(self) -> None:
        self._next_retention = time.monotonic() + self.retention_check_s
        cutoff = time.time() - self.retention_days * 86400.0
        try:
            while True:
                deleted = await asyncio.to_thread(self._delete_before, cutoff, RETENTION_CHUNK)
                if deleted < RETENTION_CHUNK:
                    break
                await asyncio.sleep(0)  # let flushes and the loop in between chunks
        except sqlite3.Error as exc:
            log.warning("ledger_retention_failed", path=self.name, error=str(exc))

    def _delete_before(self, cutoff: float, chunk: int) -> int:
        """Delete up to ``chunk`` records started before ``cutoff`` (Unix s); the triggers fix the rollup."""
        with self._lock:
            conn = self._conn
            assert conn is not None
            conn.execute("BEGIN IMMEDIATE")
            try:
                deleted = conn.execute(
                    "DELETE FROM requests WHERE seq IN (SELECT seq FROM requests WHERE started_at < ? LIMIT ?)",
                    (cutoff, chunk),
                ).rowcount
                if deleted < chunk:
                    conn.execute("DELETE FROM rollup WHERE records = 0")
                (count,) = conn.execute(COUNT).fetchone()
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            self.records = int(count)
            return int(deleted)
