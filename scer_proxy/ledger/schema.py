"""The ledger's database: the request table, the hourly rollup its triggers keep, migrations, connections,
and the tenant salt file beside the database.

The rollup holds the summed quantities of ``scer_proxy.carbon.totals`` per hour x model x tenant x status
x energy source; the triggers add each inserted row's contribution, subtract a replaced or deleted one's,
in the same transaction, so the rollup is exact. ``contribution_sql`` is the SQL twin of
``totals.contribution``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import sqlite3
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import structlog

from scer_proxy.carbon.records import Record
from scer_proxy.carbon.totals import AMOUNTS, QUANTITIES

log = structlog.get_logger("scer_proxy.ledger")

BUCKET_S = 3600  # width of a rollup bucket, seconds
SALT_BYTES = 32

# Record fields in column order, with their SQL types. A new Record field needs a migration (tests check
# that the columns are the fields).
_COLUMNS_TYPED: tuple[tuple[str, str], ...] = (
    ("request_id", "TEXT NOT NULL UNIQUE"),
    ("model", "TEXT NOT NULL"),
    ("upstream", "TEXT NOT NULL"),
    ("tenant", "TEXT NOT NULL"),
    ("endpoint", "TEXT NOT NULL"),
    ("stream", "INTEGER NOT NULL"),
    ("started_at", "REAL NOT NULL"),
    ("ended_at", "REAL"),
    ("status", "TEXT NOT NULL"),
    ("http_status", "INTEGER"),
    ("prompt_tokens", "INTEGER NOT NULL"),
    ("completion_tokens", "INTEGER NOT NULL"),
    ("token_source", "TEXT NOT NULL"),
    ("energy_j", "REAL"),
    ("energy_gpu_j", "REAL"),
    ("energy_prefill_j", "REAL"),
    ("energy_decode_j", "REAL"),
    ("energy_idle_j", "REAL"),
    ("energy_source", "TEXT NOT NULL"),
    ("energy_uncertainty_rel", "REAL"),
    ("hardware_s", "REAL"),
    ("carbon_g", "REAL"),
    ("carbon_operational_g", "REAL"),
    ("carbon_embodied_g", "REAL"),
    ("grid_intensity_g_per_kwh", "REAL"),
    ("grid_source", "TEXT NOT NULL"),
    ("grid_age_s", "REAL"),
    ("sci", "REAL"),
    ("rating", "TEXT NOT NULL"),
    ("settled", "INTEGER NOT NULL"),
    ("flags", "TEXT NOT NULL"),
)
COLUMNS: tuple[str, ...] = tuple(name for name, _ in _COLUMNS_TYPED)
_V2_COLUMNS = ("energy_gpu_j", "energy_uncertainty_rel", "grid_age_s")  # added by migration 2
_V3_COLUMNS = ("energy_idle_j",)  # added by migration 3

# Key order: model and tenant first, so the summary's GROUP BY model, tenant reads the table in key order
# (no sort); an hour range is a filter on the same scan. Cost is proportional to the buckets kept.
ROLLUP_KEY = ("model", "tenant", "hour", "status", "energy_source")


def contribution_sql(p: str) -> dict[str, str]:
    """SQL expressions of one row's contribution to each quantity (``p`` = ``NEW.``, ``OLD.`` or ``""``)."""
    metered = f"({p}energy_j IS NOT NULL)"
    return {
        "records": "1",
        "prompt_tokens": f"{p}prompt_tokens",
        "completion_tokens": f"{p}completion_tokens",
        "metered": f"{metered}",
        "settled": f"({metered} AND {p}settled)",
        "metered_completion": f"(CASE WHEN {metered} AND {p}endpoint != 'embeddings' "
        f"THEN {p}completion_tokens ELSE 0 END)",
        "metered_units": f"(CASE WHEN NOT {metered} THEN 0 WHEN {p}endpoint = 'embeddings' "
        f"THEN {p}prompt_tokens ELSE {p}completion_tokens END)",
        "energy_j": f"coalesce({p}energy_j, 0.0)",
        "carbon_g": f"(CASE WHEN {metered} THEN coalesce({p}carbon_g, 0.0) ELSE 0.0 END)",
        "carbon_operational_g": f"(CASE WHEN {metered} THEN coalesce({p}carbon_operational_g, 0.0) ELSE 0.0 END)",
        "carbon_embodied_g": f"(CASE WHEN {metered} THEN coalesce({p}carbon_embodied_g, 0.0) ELSE 0.0 END)",
    }


def summed(quantity: str, expr: str) -> str:
    """The SQL aggregate of ``expr`` for a quantity: ``total`` (a float, 0.0 when empty) for amounts."""
    return f"{'total' if quantity in AMOUNTS else 'sum'}({expr})"


def raw_sums_sql() -> str:
    """The select list summing every quantity over raw ``requests`` rows."""
    exprs = contribution_sql("")
    return ", ".join(summed(q, exprs[q]) for q in QUANTITIES)


def _rollup_upsert(p: str, sign: str) -> str:
    """The trigger statement that adds (sign ``+``) or subtracts (``-``) one row's contribution."""
    exprs = contribution_sql(p)
    values = ", ".join(f"{sign}{exprs[q]}" for q in QUANTITIES)
    updates = ", ".join(f"{c} = {c} + excluded.{c}" for c in QUANTITIES)
    return (
        f"INSERT INTO rollup ({', '.join(ROLLUP_KEY)}, {', '.join(QUANTITIES)}) "
        f"VALUES ({p}model, {p}tenant, CAST({p}started_at / {BUCKET_S} AS INTEGER), {p}status, {p}energy_source, "
        f"{values}) ON CONFLICT ({', '.join(ROLLUP_KEY)}) DO UPDATE SET {updates};"
    )


# Migrations, applied in order at open; the schema version is ``PRAGMA user_version`` (= how many ran).
# The rollup's columns are ``QUANTITIES``: a new quantity needs a migration.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # v1: the request table (seq keeps insertion order for ``recent``; a replacement keeps its seq).
    (
        "CREATE TABLE requests (seq INTEGER PRIMARY KEY, "
        + ", ".join(f"{c} {t}" for c, t in _COLUMNS_TYPED if c not in (*_V2_COLUMNS, *_V3_COLUMNS))
        + ")",
        "CREATE INDEX requests_started_at ON requests (started_at)",
    ),
    # v2: the GPU energy before PUE and the stated uncertainty of each energy figure, and the hourly
    # rollup kept by triggers (backfilled from the existing rows).
    (
        *(f"ALTER TABLE requests ADD COLUMN {c} {t}" for c, t in _COLUMNS_TYPED if c in _V2_COLUMNS),
        "CREATE TABLE rollup (model TEXT NOT NULL, tenant TEXT NOT NULL, hour INTEGER NOT NULL, "
        "status TEXT NOT NULL, energy_source TEXT NOT NULL, "
        + ", ".join(f"{c} {'REAL' if c in AMOUNTS else 'INTEGER'} NOT NULL DEFAULT 0" for c in QUANTITIES)
        + f", PRIMARY KEY ({', '.join(ROLLUP_KEY)})) WITHOUT ROWID",
        "INSERT INTO rollup (" + ", ".join(ROLLUP_KEY) + ", " + ", ".join(QUANTITIES) + ") "
        f"SELECT model, tenant, CAST(started_at / {BUCKET_S} AS INTEGER), status, energy_source, "
        + raw_sums_sql()
        + " FROM requests GROUP BY 1, 2, 3, 4, 5",
        f"CREATE TRIGGER requests_insert AFTER INSERT ON requests BEGIN {_rollup_upsert('NEW.', '+')} END",
        f"CREATE TRIGGER requests_update AFTER UPDATE ON requests BEGIN {_rollup_upsert('OLD.', '-')} "
        f"{_rollup_upsert('NEW.', '+')} END",
        f"CREATE TRIGGER requests_delete AFTER DELETE ON requests BEGIN {_rollup_upsert('OLD.', '-')} END",
    ),
    # v3: the amortized idle energy in each energy figure (NULL for the records written before: unknown).
    tuple(f"ALTER TABLE requests ADD COLUMN {c} {t}" for c, t in _COLUMNS_TYPED if c in _V3_COLUMNS),
)
SCHEMA_VERSION = len(MIGRATIONS)

UPSERT = (
    f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' for _ in COLUMNS)}) "
    "ON CONFLICT (request_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS if c != "request_id")
)
SELECT = f"SELECT {', '.join(COLUMNS)} FROM requests"
COUNT = "SELECT coalesce(sum(records), 0) FROM rollup"  # the records in the database


class LedgerError(Exception):
    """The ledger database (or its salt file) cannot be used: the message names the file and the reason."""


class CorruptDatabase(LedgerError):
    """The file is not an SQLite database, or a damaged one (``storage.on_corrupt`` decides)."""


def corrupt(exc: sqlite3.DatabaseError) -> bool:
    """Whether SQLite's error says the file is not a database or is damaged (not a fault of the medium)."""
    return getattr(exc, "sqlite_errorname", "").startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT"))


def file_identity(path: str) -> tuple[int, int] | None:
    """The (device, inode) of the file at ``path`` now; None when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def move_aside(db_path: str, stamp: str) -> str:
    """Rename a corrupt database (and its ``-wal`` and ``-shm``) to ``<path>.corrupt-<stamp>``; returns
    the new path. The tenant salt stays, so tenants keep their hashes in the new database."""
    aside = f"{db_path}.corrupt-{stamp}"
    os.rename(db_path, aside)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(db_path + suffix):
            os.rename(db_path + suffix, aside + suffix)
    return aside


def remove_orphans(db_path: str) -> None:
    """Remove the ``-wal`` and ``-shm`` of a database file that is gone (deleted while open): a new
    database at the same path must not start from them."""
    if os.path.exists(db_path):
        return
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(db_path + suffix)


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
        _write_closing(fd, salt)
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


def restore_salt(db_path: str | os.PathLike[str], salt: bytes) -> bool:
    """Write the salt in use back to ``<db>.salt`` if the file is gone (deleted with the database), so
    tenants keep their hashes after a restart; True when it was written."""
    path = f"{os.fspath(db_path)}.salt"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    _write_closing(fd, salt)
    return True


def _write_closing(fd: int, data: bytes) -> None:
    """Write ``data`` to the new file ``fd``, to the disk, and close it."""
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def to_row(r: Record) -> tuple[Any, ...]:
    """A record as the values of ``COLUMNS``."""
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
        r.energy_idle_j,
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


# ``SELECT``'s columns are the record's fields in order, so a row becomes a record positionally.
if COLUMNS != tuple(f.name for f in fields(Record)):  # pragma: no cover - a change of one without the other
    raise ImportError("the ledger's columns must follow the fields of Record, in order")
_STREAM, _SETTLED, _FLAGS = (COLUMNS.index(name) for name in ("stream", "settled", "flags"))


def from_row(row: Sequence[Any]) -> Record:
    """The record of a row of ``SELECT`` (positional: five times faster than by keyword, and
    ``/scer/requests`` makes 10,000 of these on a read thread that shares the GIL with the loop)."""
    values = list(row)
    values[_STREAM] = bool(values[_STREAM])
    values[_SETTLED] = bool(values[_SETTLED])
    flags = values[_FLAGS]
    values[_FLAGS] = tuple(f for f in flags.split(",") if f) if flags else ()
    return Record(*values)


def connect(path: str, *, read_only: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), usable from any thread."""
    if read_only:
        uri = Path(path).resolve().as_uri() + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def check_directory(name: str, db_path: str) -> None:
    """LedgerError when the database's directory does not exist (``name``: the path as configured)."""
    parent = os.path.dirname(os.path.abspath(db_path))
    if not os.path.isdir(parent):
        raise LedgerError(f"cannot open ledger database {name!r}: no such directory {parent!r}")


def migrate(conn: sqlite3.Connection, name: str) -> None:
    """Apply the migrations the database lacks, each in its own transaction."""
    (version,) = conn.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise LedgerError(
            f"ledger database {name!r} has schema v{version}, newer than this scer-proxy's v{SCHEMA_VERSION}"
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
        log.info("ledger_migrated", path=name, version=number + 1)


def open_writer(name: str, db_path: str) -> tuple[sqlite3.Connection, int]:
    """The writer's connection (WAL, ``synchronous=NORMAL``, migrated) and the records in the database.

    A fault of the medium (read-only, full, locked) raises ``sqlite3.OperationalError`` (``retryable``);
    anything else wrong with the file raises ``LedgerError``.
    """
    check_directory(name, db_path)
    try:
        conn = connect(db_path)
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot open ledger database {name!r}: {exc}") from exc
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        migrate(conn, name)
        conn.execute("BEGIN IMMEDIATE")  # fails now, not at the first flush, when the file is read-only
        conn.execute("ROLLBACK")
        (records,) = conn.execute(COUNT).fetchone()
    except sqlite3.DatabaseError as exc:
        conn.close()
        if isinstance(exc, sqlite3.OperationalError) and retryable(exc):
            raise
        if corrupt(exc):
            raise CorruptDatabase(
                f'cannot open ledger database {name!r}: {exc} (storage.on_corrupt = "move-aside" '
                f"moves it aside and starts a new one)"
            ) from exc
        raise LedgerError(f"cannot open ledger database {name!r}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn, int(records)


def open_readers(
    name: str, db_path: str, *, read_only: bool
) -> tuple[sqlite3.Connection, sqlite3.Connection]:
    """Two reading connections (the event loop's and the aggregations'); LedgerError unless the database
    exists with this code's schema version."""
    if read_only and not os.path.exists(db_path):
        raise LedgerError(f"no such ledger database: {name!r}")
    try:
        reader = connect(db_path, read_only=read_only)
        (version,) = reader.execute("PRAGMA user_version").fetchone()
        if version != SCHEMA_VERSION:
            reader.close()
            raise LedgerError(
                f"ledger database {name!r} has schema v{version}; this scer-proxy reads "
                f"v{SCHEMA_VERSION} (open it once with `scer-proxy serve` to migrate)"
            )
        return reader, connect(db_path, read_only=read_only)
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"cannot read ledger database {name!r}: {exc}") from exc


def retryable(exc: sqlite3.OperationalError) -> bool:
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
