"""The durable ledger of request records: SQLite in WAL mode behind one writer task.

``put`` never blocks: it puts the record in an in-memory pending map (keyed by request id, so the
settled figure replaces the response-time one before it is ever written). A writer task flushes the
map every ``flush_interval_s`` in one transaction (``executemany`` UPSERT on ``request_id``) on a
thread, so the event loop never waits on the disk. Reads see records not yet written: they are served
from the pending map first.

The summary is aggregated in SQL from an hourly rollup (hour x model x tenant x status x energy
source) that triggers keep exact in the same transaction as each insert, replacement or delete (a
replacement subtracts the old contribution and adds the new one); only the partial hour at the start
of a ``since`` window is read from raw rows. A million records sum in milliseconds.

Faults (a full disk, a read-only file): the proxy keeps serving, records stay in memory up to
``max_pending`` (oldest dropped beyond it, counted in ``dropped``), the flush is retried with
backoff, and ``health()`` shows the error until a flush succeeds again.

A record holds ids, times, model, upstream, tenant (a salted hash or the named tenant), tokens,
energy, carbon, intensity and source, status and flags: never prompt or completion text, never a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from scer_proxy.carbon.records import Record

log = structlog.get_logger("scer_proxy.ledger")

BUCKET_S = 3600  # width of a rollup bucket, seconds
SALT_BYTES = 32

# Record fields, in column order. A new Record field needs a migration (tests check the two agree).
COLUMNS: tuple[str, ...] = (
    "request_id",
    "model",
    "upstream",
    "tenant",
    "endpoint",
    "stream",
    "started_at",
    "ended_at",
    "status",
    "http_status",
    "prompt_tokens",
    "completion_tokens",
    "token_source",
    "energy_j",
    "energy_gpu_j",
    "energy_prefill_j",
    "energy_decode_j",
    "energy_source",
    "energy_uncertainty_rel",
    "hardware_s",
    "carbon_g",
    "carbon_operational_g",
    "carbon_embodied_g",
    "grid_intensity_g_per_kwh",
    "grid_source",
    "grid_age_s",
    "sci",
    "rating",
    "settled",
    "flags",
)

# The summed quantities of a group of records, in order: the rollup's columns and the raw aggregate's.
SUMS: tuple[str, ...] = (
    "records",
    "prompt_tokens",
    "completion_tokens",
    "metered",
    "settled",
    "metered_completion",
    "metered_units",
    "energy_j",
    "carbon_g",
    "carbon_operational_g",
    "carbon_embodied_g",
)
_N = len(SUMS)
_METERED, _METERED_COMPLETION, _METERED_UNITS = (
    SUMS.index("metered"),
    SUMS.index("metered_completion"),
    SUMS.index("metered_units"),
)
# Key order: model and tenant first, so the summary's GROUP BY model, tenant reads the table in key order
# (no sort); an hour range is a filter on the same scan. Cost is proportional to the buckets kept.
_ROLLUP_KEY = ("model", "tenant", "hour", "status", "energy_source")


def _contribution_sql(p: str) -> tuple[str, ...]:
    """SQL expressions of one row's contribution to ``SUMS`` (``p`` = ``NEW.``, ``OLD.`` or ``""``)."""
    metered = f"({p}energy_j IS NOT NULL)"
    return (
        "1",
        f"{p}prompt_tokens",
        f"{p}completion_tokens",
        f"{metered}",
        f"({metered} AND {p}settled)",
        f"(CASE WHEN {metered} AND {p}endpoint != 'embeddings' THEN {p}completion_tokens ELSE 0 END)",
        f"(CASE WHEN NOT {metered} THEN 0 WHEN {p}endpoint = 'embeddings' THEN {p}prompt_tokens "
        f"ELSE {p}completion_tokens END)",
        f"coalesce({p}energy_j, 0.0)",
        f"(CASE WHEN {metered} THEN coalesce({p}carbon_g, 0.0) ELSE 0.0 END)",
        f"(CASE WHEN {metered} THEN coalesce({p}carbon_operational_g, 0.0) ELSE 0.0 END)",
        f"(CASE WHEN {metered} THEN coalesce({p}carbon_embodied_g, 0.0) ELSE 0.0 END)",
    )


def _rollup_upsert(p: str, sign: str) -> str:
    """The trigger statement that adds (sign ``+``) or subtracts (``-``) one row's contribution."""
    values = ", ".join(f"{sign}{expr}" for expr in _contribution_sql(p))
    updates = ", ".join(f"{c} = {c} + excluded.{c}" for c in SUMS)
    return (
        f"INSERT INTO rollup ({', '.join(_ROLLUP_KEY)}, {', '.join(SUMS)}) "
        f"VALUES ({p}model, {p}tenant, CAST({p}started_at / {BUCKET_S} AS INTEGER), {p}status, {p}energy_source, "
        f"{values}) ON CONFLICT ({', '.join(_ROLLUP_KEY)}) DO UPDATE SET {updates};"
    )


_V2_COLUMNS = ("energy_gpu_j", "energy_uncertainty_rel", "grid_age_s")  # added by migration 2
_V1_COLUMNS = [c for c in COLUMNS if c not in _V2_COLUMNS]
_COLUMN_TYPES = {
    "request_id": "TEXT NOT NULL UNIQUE",
    "stream": "INTEGER NOT NULL",
    "started_at": "REAL NOT NULL",
    "ended_at": "REAL",
    "http_status": "INTEGER",
    "prompt_tokens": "INTEGER NOT NULL",
    "completion_tokens": "INTEGER NOT NULL",
    "settled": "INTEGER NOT NULL",
}
for _c in (
    "energy_j",
    "energy_gpu_j",
    "energy_prefill_j",
    "energy_decode_j",
    "energy_uncertainty_rel",
    "hardware_s",
    "carbon_g",
    "carbon_operational_g",
    "carbon_embodied_g",
    "grid_intensity_g_per_kwh",
    "grid_age_s",
    "sci",
):
    _COLUMN_TYPES[_c] = "REAL"

# Migrations, applied in order at open; the schema version is ``PRAGMA user_version`` (= how many ran).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # v1: the request table (seq keeps insertion order for ``recent``; a replacement keeps its seq).
    (
        "CREATE TABLE requests (seq INTEGER PRIMARY KEY, "
        + ", ".join(f"{c} {_COLUMN_TYPES.get(c, 'TEXT NOT NULL')}" for c in _V1_COLUMNS)
        + ")",
        "CREATE INDEX requests_started_at ON requests (started_at)",
    ),
    # v2: the GPU energy before PUE and the stated uncertainty of each energy figure, and the hourly
    # rollup kept by triggers (backfilled from the existing rows).
    (
        "ALTER TABLE requests ADD COLUMN energy_gpu_j REAL",
        "ALTER TABLE requests ADD COLUMN energy_uncertainty_rel REAL",
        "ALTER TABLE requests ADD COLUMN grid_age_s REAL",
        "CREATE TABLE rollup (model TEXT NOT NULL, tenant TEXT NOT NULL, hour INTEGER NOT NULL, "
        "status TEXT NOT NULL, energy_source TEXT NOT NULL, "
        + ", ".join(
            f"{c} {'REAL' if c.startswith(('energy', 'carbon')) else 'INTEGER'} NOT NULL DEFAULT 0"
            for c in SUMS
        )
        + f", PRIMARY KEY ({', '.join(_ROLLUP_KEY)})) WITHOUT ROWID",
        "INSERT INTO rollup (" + ", ".join(_ROLLUP_KEY) + ", " + ", ".join(SUMS) + ") "
        f"SELECT model, tenant, CAST(started_at / {BUCKET_S} AS INTEGER), status, energy_source, "
        + ", ".join(
            f"total({e})" if i >= SUMS.index("energy_j") else f"sum({e})"
            for i, e in enumerate(_contribution_sql(""))
        )
        + " FROM requests GROUP BY 1, 2, 3, 4, 5",
        f"CREATE TRIGGER requests_insert AFTER INSERT ON requests BEGIN {_rollup_upsert('NEW.', '+')} END",
        f"CREATE TRIGGER requests_update AFTER UPDATE ON requests BEGIN {_rollup_upsert('OLD.', '-')} "
        f"{_rollup_upsert('NEW.', '+')} END",
        f"CREATE TRIGGER requests_delete AFTER DELETE ON requests BEGIN {_rollup_upsert('OLD.', '-')} END",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

_UPSERT = (
    f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)}) "
    "ON CONFLICT (request_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c != "request_id")
)
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM requests"


class LedgerError(Exception):
    """The ledger database (or its salt file) cannot be used: the message names the file and the reason."""


def tenant_salt(db_path: str | os.PathLike[str]) -> bytes:
    """The salt of tenant hashes, kept in ``<db>.salt`` beside the database (32 random bytes, mode 0600).

    Created on first use; the same file gives the same tenants across restarts. ``:memory:`` gets a
    fresh random salt. Raises ``LedgerError`` when the file cannot be read, created, or has a wrong size.
    """
    if str(db_path) == ":memory:":
        return secrets.token_bytes(SALT_BYTES)
    path = Path(f"{os.fspath(db_path)}.salt")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as exc:
        raise LedgerError(f"cannot create tenant salt file {str(path)!r}: {exc.strerror}") from exc
    else:
        salt = secrets.token_bytes(SALT_BYTES)
        try:
            os.write(fd, salt)
            os.fsync(fd)
        finally:
            os.close(fd)
        return salt
    try:
        salt = path.read_bytes()
    except OSError as exc:
        raise LedgerError(f"cannot read tenant salt file {str(path)!r}: {exc.strerror}") from exc
    if len(salt) != SALT_BYTES:
        raise LedgerError(
            f"tenant salt file {str(path)!r}: expected {SALT_BYTES} bytes, found {len(salt)} "
            f"(restore it, or delete it to start new tenant hashes)"
        )
    return salt


def _to_row(r: Record) -> tuple[Any, ...]:
    return (
        r.request_id,
        r.model,
        r.upstream,
        r.tenant,
        r.endpoint,
        int(r.stream),
        r.started_at,
        r.ended_at,
        r.status,
        r.http_status,
        r.prompt_tokens,
        r.completion_tokens,
        r.token_source,
        r.energy_j,
        r.energy_gpu_j,
        r.energy_prefill_j,
        r.energy_decode_j,
        r.energy_source,
        r.energy_uncertainty_rel,
        r.hardware_s,
        r.carbon_g,
        r.carbon_operational_g,
        r.carbon_embodied_g,
        r.grid_intensity_g_per_kwh,
        r.grid_source,
        r.grid_age_s,
        r.sci,
        r.rating,
        int(r.settled),
        ",".join(r.flags),
    )


def _from_row(row: Sequence[Any]) -> Record:
    values = dict(zip(COLUMNS, row, strict=True))
    values["stream"] = bool(values["stream"])
    values["settled"] = bool(values["settled"])
    values["flags"] = tuple(f for f in values["flags"].split(",") if f)
    return Record(**values)


def _contribution(r: Record) -> tuple[float, ...]:
    """One record's contribution to ``SUMS`` (the Python twin of ``_contribution_sql``)."""
    if r.energy_j is None:
        return (1, r.prompt_tokens, r.completion_tokens, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0)
    units = r.prompt_tokens if r.endpoint == "embeddings" else r.completion_tokens
    return (
        1,
        r.prompt_tokens,
        r.completion_tokens,
        1,
        int(r.settled),
        0 if r.endpoint == "embeddings" else r.completion_tokens,
        units,
        r.energy_j,
        r.carbon_g or 0.0,
        r.carbon_operational_g or 0.0,
        r.carbon_embodied_g or 0.0,
    )


def _add(
    acc: dict[tuple[str, ...], list[float]], key: tuple[str, ...], values: Sequence[float], sign: float = 1.0
) -> None:
    sums = acc.get(key)
    if sums is None:
        sums = acc[key] = [0] * _N
    for i, v in enumerate(values):
        sums[i] += sign * v if sign != 1.0 else v


def totals_from_sums(sums: Sequence[float]) -> dict[str, Any]:
    """The keys of the summary's ``totals`` from summed quantities (``SUMS`` order); same rules as summary.py."""
    s = dict(zip(SUMS, sums, strict=True))
    metered = round(s["metered"])
    energy_j, carbon_g = float(s["energy_j"]), float(s["carbon_g"])
    metered_completion, metered_units = round(s["metered_completion"]), round(s["metered_units"])
    return {
        "requests": round(s["records"]),
        "prompt_tokens": round(s["prompt_tokens"]),
        "completion_tokens": round(s["completion_tokens"]),
        "energy_j": energy_j if metered else None,
        "carbon_g": carbon_g if metered else None,
        "carbon_operational_g": float(s["carbon_operational_g"]) if metered else None,
        "carbon_embodied_g": float(s["carbon_embodied_g"]) if metered else None,
        "energy_j_per_1k_output_tokens": energy_j * 1000.0 / metered_completion
        if metered_completion
        else None,
        "sci": carbon_g * 1000.0 / metered_units if metered_units else None,
        "metered_requests": metered,
        "settled_requests": round(s["settled"]),
    }


@dataclass(frozen=True)
class _Filter:
    start: float | None  # Unix seconds; records started at or after it
    model: str | None
    tenant: str | None

    def accepts(self, r: Record) -> bool:
        return (
            r.status != "running"
            and (self.start is None or r.started_at >= self.start)
            and (self.model is None or r.model == self.model)
            and (self.tenant is None or r.tenant == self.tenant)
        )

    def where(self) -> tuple[str, list[Any]]:
        clauses, params = ["status != 'running'"], []
        if self.model is not None:
            clauses.append("model = ?")
            params.append(self.model)
        if self.tenant is not None:
            clauses.append("tenant = ?")
            params.append(self.tenant)
        return " AND ".join(clauses), params


def _connect(path: str, *, read_only: bool = False) -> sqlite3.Connection:
    if read_only:
        uri = Path(path).resolve().as_uri() + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


COUNT_EVERY_S = 2.0  # how often the writer recounts the rows in the database


class SqliteLedger:
    """Request records in SQLite (WAL, ``synchronous=NORMAL``), written in batches by one writer task.

    ``flush_interval_s``: seconds between flushes (a kill -9 loses at most the records of the last one).
    ``max_pending``: records held in memory while the database cannot be written (oldest dropped beyond).
    ``retention_days``: records started longer ago are deleted (checked at open and every
    ``retention_check_s`` seconds). ``path`` ``":memory:"`` uses a temporary file removed at close.
    ``read_only`` opens for reading only (``scer-proxy report``): no writer, no migrations.
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
    ) -> None:
        self.path = os.fspath(path)
        self.flush_interval_s = flush_interval_s
        self.max_pending = max_pending
        self.retention_days = retention_days
        self.retention_check_s = retention_check_s
        self.read_only = read_only
        self.dropped = 0  # records dropped because the database could not be written and memory was full
        self.tenant_salt = b""
        self._tmpdir: str | None = None
        self._db_path = self.path
        self._pending: dict[str, Record] = {}
        self._flushing: dict[str, Record] = {}
        self._writer: sqlite3.Connection | None = None
        self._writer_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None  # the event loop's (get, recent)
        self._aggregator: sqlite3.Connection | None = None  # summaries, on a worker thread
        self._aggregator_lock = threading.Lock()
        self._records = 0
        self._counted_at = -math.inf
        self._last_error: str | None = None
        self._failures = 0
        self._last_flush = time.monotonic()
        self._next_retention = 0.0
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._waiters: list[asyncio.Future[bool]] = []
        self._closing = False

    # ---------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        """Open (creating and migrating as needed) and start the writer task.

        Raises ``LedgerError`` when the file cannot be opened at all (a missing directory, not a
        database, a schema newer than this code); a database that is readable but cannot be written
        (read-only, full) is opened degraded and retried by the writer.
        """
        if self.path == ":memory:":
            self._tmpdir = tempfile.mkdtemp(prefix="scer-ledger-")
            self._db_path = os.path.join(self._tmpdir, "ledger.db")
        if self.read_only:
            await asyncio.to_thread(self._open_readers)
            return
        await asyncio.to_thread(self._prepare)
        try:
            await asyncio.to_thread(self._open_writer)
        except sqlite3.OperationalError as exc:
            if not _retryable(exc):
                raise LedgerError(f"cannot open ledger database {self.path!r}: {exc}") from exc
            self._fault(exc)
        if self._writer is not None:
            await asyncio.to_thread(self._open_readers)
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="ledger-writer")

    def _prepare(self) -> None:
        """Check the database's directory and read (or create) the tenant salt beside it."""
        parent = os.path.dirname(os.path.abspath(self._db_path))
        if not os.path.isdir(parent):
            raise LedgerError(f"cannot open ledger database {self.path!r}: no such directory {parent!r}")
        if not self.tenant_salt:
            self.tenant_salt = tenant_salt(self.path)

    def _open_writer(self) -> None:
        parent = os.path.dirname(os.path.abspath(self._db_path))
        if not os.path.isdir(parent):
            raise LedgerError(f"cannot open ledger database {self.path!r}: no such directory {parent!r}")
        try:
            conn = _connect(self._db_path)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open ledger database {self.path!r}: {exc}") from exc
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._migrate(conn)
            conn.execute("BEGIN IMMEDIATE")  # fails now, not at the first flush, when the file is read-only
            conn.execute("ROLLBACK")
            (records,) = conn.execute("SELECT coalesce(sum(records), 0) FROM rollup").fetchone()
        except sqlite3.DatabaseError as exc:
            conn.close()
            if isinstance(exc, sqlite3.OperationalError) and _retryable(exc):
                raise
            raise LedgerError(f"cannot open ledger database {self.path!r}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        self._writer = conn
        self._records = int(records)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"ledger database {self.path!r} has schema v{version}, newer than this "
                f"scer-proxy's v{SCHEMA_VERSION}"
            )
        for number in range(version, SCHEMA_VERSION):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[number]:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {number + 1}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            log.info("ledger_migrated", path=self.path, version=number + 1)

    def _open_readers(self) -> None:
        if self.read_only and not os.path.exists(self._db_path):
            raise LedgerError(f"no such ledger database: {self.path!r}")
        try:
            reader = _connect(self._db_path, read_only=self.read_only)
            (version,) = reader.execute("PRAGMA user_version").fetchone()
            if version != SCHEMA_VERSION:
                reader.close()
                raise LedgerError(
                    f"ledger database {self.path!r} has schema v{version}; this scer-proxy reads "
                    f"v{SCHEMA_VERSION} (open it once with `scer-proxy serve` to migrate)"
                )
            if self.read_only:
                (records,) = reader.execute("SELECT coalesce(sum(records), 0) FROM rollup").fetchone()
                self._records = int(records)
            self._reader = reader
            self._aggregator = _connect(self._db_path, read_only=self.read_only)
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"cannot read ledger database {self.path!r}: {exc}") from exc

    async def close(self) -> None:
        """Stop the writer after a final flush (retried briefly on a fault), then close the database."""
        self._closing = True
        if self._task is not None and self._wake is not None:
            self._wake.set()
            await self._task
            self._task = None
        await asyncio.to_thread(self._close_sync)

    def _close_sync(self) -> None:
        for conn in (self._writer, self._reader, self._aggregator):
            if conn is not None:
                conn.close()
        self._writer = self._reader = self._aggregator = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

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
                path=self.path,
                max_pending=self.max_pending,
                last_error=self._last_error,
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
                            path=self.path,
                            records=len(self._pending),
                            last_error=self._last_error,
                        )
                    return
                await asyncio.sleep(min(1.0, self._delay_s()))
                continue
            if ok and time.monotonic() >= self._next_retention:
                await self._retention()

    async def _flush_once(self) -> bool:
        if self._writer is None:
            try:
                await asyncio.to_thread(self._open_writer)
                if self._reader is None:
                    await asyncio.to_thread(self._open_readers)
            except sqlite3.OperationalError as exc:
                self._fault(exc)
                return False
            except LedgerError as exc:
                self._fault(exc)
                return False
        batch = self._pending
        if not batch:
            self._last_flush = time.monotonic()
            return True
        self._pending, self._flushing = {}, batch
        try:
            records = await asyncio.to_thread(self._write, list(batch.values()))
        except sqlite3.Error as exc:
            merged = dict(batch)
            merged.update(self._pending)
            self._pending, self._flushing = merged, {}
            self._drop_oldest()
            self._fault(exc)
            return False
        self._flushing = {}
        if records is not None:
            self._records = records
        self._last_flush = time.monotonic()
        if self._failures:
            log.info("ledger_recovered", path=self.path, after_failures=self._failures)
        self._failures, self._last_error = 0, None
        return not self._pending

    def _fault(self, exc: BaseException) -> None:
        if self._failures == 0:
            log.error("ledger_write_failed", path=self.path, error=str(exc), pending=len(self._pending))
        self._failures += 1
        self._last_error = f"{type(exc).__name__}: {exc}"

    def _write(self, records: list[Record]) -> int | None:
        """One transaction: upsert the batch (triggers keep the rollup). Returns the rows in the database,
        counted at most every few seconds (the count reads the whole rollup), else None."""
        with self._writer_lock:
            conn = self._writer
            assert conn is not None
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_UPSERT, [_to_row(r) for r in records])
                count = None
                now = time.monotonic()
                if now - self._counted_at >= COUNT_EVERY_S:
                    (count,) = conn.execute("SELECT coalesce(sum(records), 0) FROM rollup").fetchone()
                    self._counted_at = now
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            return None if count is None else int(count)

    async def _retention(self) -> None:
        self._next_retention = time.monotonic() + self.retention_check_s
        cutoff = time.time() - self.retention_days * 86400.0
        try:
            while True:
                deleted = await asyncio.to_thread(self._delete_before, cutoff, 5000)
                if deleted < 5000:
                    break
                await asyncio.sleep(0)  # let flushes and the loop in between chunks
        except sqlite3.Error as exc:
            log.warning("ledger_retention_failed", path=self.path, error=str(exc))

    def _delete_before(self, cutoff: float, chunk: int) -> int:
        """Delete up to ``chunk`` records started before ``cutoff`` (Unix s); the triggers fix the rollup."""
        with self._writer_lock:
            conn = self._writer
            assert conn is not None
            conn.execute("BEGIN IMMEDIATE")
            try:
                deleted = conn.execute(
                    "DELETE FROM requests WHERE seq IN (SELECT seq FROM requests WHERE started_at < ? LIMIT ?)",
                    (cutoff, chunk),
                ).rowcount
                if deleted < chunk:
                    conn.execute("DELETE FROM rollup WHERE records = 0")
                (count,) = conn.execute("SELECT coalesce(sum(records), 0) FROM rollup").fetchone()
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            self._records = int(count)
            return int(deleted)

    async def run_retention(self) -> None:
        """Apply retention now (tests; the writer does it at open and every ``retention_check_s``)."""
        if self._writer is not None:
            await self._retention()

    # ---------------------------------------------------------------- reading

    def _overlay(self) -> dict[str, Record]:
        """Records not yet in the database (being written, then pending; newest figure wins)."""
        if not self._flushing:
            return dict(self._pending)
        overlay = dict(self._flushing)
        overlay.update(self._pending)
        return overlay

    def get(self, request_id: str) -> Record | None:
        """The record with this id (pending first, then the database: one indexed lookup), or None."""
        record = self._pending.get(request_id) or self._flushing.get(request_id)
        if record is not None or self._reader is None:
            return record
        row = self._reader.execute(f"{_SELECT} WHERE request_id = ?", (request_id,)).fetchone()
        return _from_row(row) if row is not None else None

    def recent(self, limit: int) -> list[Record]:
        """Up to ``limit`` records, most recently put first (one indexed range read)."""
        overlay = self._overlay()
        tail = list(itertools.islice(reversed(overlay.values()), limit))
        reader = self._reader
        if reader is None:
            return tail
        reader.execute("BEGIN")
        try:
            in_db = self._ids_in_db(reader, [r.request_id for r in tail])
            fresh = [r for r in tail if r.request_id not in in_db]
            rows = reader.execute(f"{_SELECT} ORDER BY seq DESC LIMIT ?", (limit - len(fresh),)).fetchall()
        finally:
            reader.execute("COMMIT")
        stored = [_from_row(row) for row in rows]
        return fresh + [overlay.get(r.request_id, r) for r in stored]

    @staticmethod
    def _ids_in_db(conn: sqlite3.Connection, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            found.update(
                row[0]
                for row in conn.execute(
                    f"SELECT request_id FROM requests WHERE request_id IN ({','.join('?' * len(chunk))})",
                    chunk,
                )
            )
        return found

    @staticmethod
    def _stored(conn: sqlite3.Connection, ids: Sequence[str]) -> list[Record]:
        out: list[Record] = []
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            out.extend(
                _from_row(row)
                for row in conn.execute(
                    f"{_SELECT} WHERE request_id IN ({','.join('?' * len(chunk))})", chunk
                )
            )
        return out

    def __len__(self) -> int:
        """Records in the database (``pending`` ones not counted until written)."""
        return self._records

    @property
    def pending(self) -> int:
        """Records put but not yet in the database."""
        return len(self._pending) + len(self._flushing)

    def __iter__(self) -> Iterator[Record]:
        """Every record (database then pending, newest figure of each): for tests and exports, not hot paths."""
        overlay = self._overlay()
        conn = self._aggregator
        if conn is not None:
            with self._aggregator_lock:
                rows = conn.execute(f"{_SELECT} ORDER BY seq").fetchall()
            for row in rows:
                record = _from_row(row)
                yield overlay.pop(record.request_id, record)
        yield from overlay.values()

    def health(self) -> dict[str, Any]:
        """``/scer/health``'s ledger object: kind, path, records (in the database), pending, dropped,
        last_error (None when the last flush succeeded), healthy, last_flush_age_ms."""
        return {
            "kind": self.kind,
            "path": self.path,
            "records": self._records,
            "pending": self.pending,
            "dropped": self.dropped,
            "last_error": self._last_error,
            "healthy": self._last_error is None and (self._writer is not None or self.read_only),
            "last_flush_age_ms": round((time.monotonic() - self._last_flush) * 1000.0, 1),
            "flush_interval_ms": self.flush_interval_s * 1000.0,
            "schema_version": SCHEMA_VERSION,
        }

    # ---------------------------------------------------------------- aggregation

    def _sums(
        self, group_by: Sequence[str], flt: _Filter, overlay: dict[str, Record]
    ) -> dict[tuple[str, ...], list[float]]:
        """Sums (``SUMS`` order) per group of ``group_by`` (columns of the rollup, not hour) over the records
        the filter accepts: rollup buckets, raw rows of the partial first bucket, and the overlay's delta
        (its records added, the database's older figure of the same ids subtracted, in one snapshot)."""
        acc: dict[tuple[str, ...], list[float]] = {}
        conn = self._aggregator
        keys = ", ".join(group_by)
        where, params = flt.where()
        if conn is not None:
            with self._aggregator_lock:
                conn.execute("BEGIN")
                try:
                    if flt.start is None:
                        bucket_where, bucket_params = where, params
                    else:
                        first = int(flt.start // BUCKET_S)
                        bucket_where, bucket_params = f"hour > ? AND {where}", [first, *params]
                        raw = ", ".join(
                            f"{'total' if i >= SUMS.index('energy_j') else 'sum'}({e})"
                            for i, e in enumerate(_contribution_sql(""))
                        )
                        for row in conn.execute(
                            f"SELECT {keys}, {raw} FROM requests WHERE started_at >= ? AND started_at < ? "
                            f"AND {where} GROUP BY {keys}",
                            [flt.start, (first + 1) * BUCKET_S, *params],
                        ):
                            _add(acc, tuple(row[: len(group_by)]), row[len(group_by) :])
                    sums = ", ".join(
                        f"{'total' if c.startswith(('energy', 'carbon')) else 'sum'}({c})" for c in SUMS
                    )
                    for row in conn.execute(
                        f"SELECT {keys}, {sums} FROM rollup WHERE {bucket_where} GROUP BY {keys}",
                        bucket_params,
                    ):
                        _add(acc, tuple(row[: len(group_by)]), row[len(group_by) :])
                    old = self._stored(conn, list(overlay)) if overlay else []
                finally:
                    conn.execute("COMMIT")
            for r in old:
                if flt.accepts(r):
                    _add(acc, tuple(getattr(r, k) for k in group_by), _contribution(r), -1.0)
        for r in overlay.values():
            if flt.accepts(r):
                _add(acc, tuple(getattr(r, k) for k in group_by), _contribution(r))
        return {k: v for k, v in acc.items() if round(v[0]) != 0}

    def _first_started(self, flt: _Filter, overlay: dict[str, Record]) -> float | None:
        """The earliest ``started_at`` of the records the filter accepts (first non-empty bucket, then raw)."""
        first: float | None = None
        conn = self._aggregator
        if conn is not None:
            where, params = flt.where()
            with self._aggregator_lock:
                (hour,) = conn.execute(
                    f"SELECT min(hour) FROM rollup WHERE records > 0 AND {where}", params
                ).fetchone()
                if hour is not None:
                    (first,) = conn.execute(
                        f"SELECT min(started_at) FROM requests WHERE started_at >= ? AND {where}",
                        [hour * BUCKET_S, *params],
                    ).fetchone()
        for r in overlay.values():
            if flt.accepts(r) and (first is None or r.started_at < first):
                first = r.started_at
        return first

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
        flt = _Filter(None if since_s is None else end - since_s, model, tenant)
        overlay = self._overlay() if overlay is None else overlay
        groups = self._sums(("model", "tenant"), flt, overlay)
        total: list[float] = [0] * _N
        by_model: dict[tuple[str, ...], list[float]] = {}
        by_tenant: dict[tuple[str, ...], list[float]] = {}
        for (model_name, tenant_name), sums in groups.items():
            _add(by_model, (model_name,), sums)
            _add(by_tenant, (tenant_name,), sums)
            for i, v in enumerate(sums):
                total[i] += v
        start = flt.start if flt.start is not None else self._first_started(flt, overlay)
        return {
            "window": {"start": start, "end": end},
            "totals": totals_from_sums(total),
            "models": [
                {
                    "model": name,
                    "category": (categories or {}).get(name),
                    "grade": (grades or {}).get(name, "unrated"),
                    **totals_from_sums(sums),
                }
                for (name,), sums in sorted(by_model.items())
            ],
            "tenants": [
                {"tenant": name, **totals_from_sums(sums)} for (name,), sums in sorted(by_tenant.items())
            ],
        }

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
        overlay = self._overlay()  # taken on the loop, before the snapshot, so no record falls in between
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
        overlay = self._overlay() if overlay is None else overlay
        groups = self._sums(("model", "status", "energy_source"), _Filter(None, None, None), overlay)
        return [
            {"model": m, "status": s, "energy_source": e, **dict(zip(SUMS, sums, strict=True))}
            for (m, s, e), sums in sorted(groups.items())
        ]

    async def metrics_rows(self) -> list[dict[str, Any]]:
        """For ``/metrics``: one dict per model x status x energy source with ``SUMS`` (records, tokens,
        energy_j in joules, carbon_*_g in grams) over every finished record kept (retention applies)."""
        overlay = self._overlay()
        return await asyncio.to_thread(self.metrics_rows_sync, overlay)

    # ---------------------------------------------------------------- tests and tools

    async def on_writer(self, statement: str) -> None:
        """Execute one statement on the writer's connection (tests: fault injection with PRAGMAs)."""

        def run() -> None:
            with self._writer_lock:
                assert self._writer is not None
                self._writer.execute(statement)

        await asyncio.to_thread(run)


def _retryable(exc: sqlite3.OperationalError) -> bool:
    """A fault of the medium that may go away (read-only, full, locked, I/O), not of the file itself."""
    name = getattr(exc, "sqlite_errorname", "")
    return (
        name.startswith(
            (
                "SQLITE_READONLY",
                "SQLITE_FULL",
                "SQLITE_BUSY",
                "SQLITE_LOCKED",
                "SQLITE_IOERR",
                "SQLITE_CANTOPEN",
            )
        )
        or "readonly" in str(exc)
        or "disk is full" in str(exc)
    )
