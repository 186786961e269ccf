"""The SQLite ledger: round trips, the rollup summary against the raw records, migrations, faults, retention."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from scer_proxy.carbon.records import Record
from scer_proxy.carbon.totals import QUANTITIES, contribution
from scer_proxy.ledger.schema import (
    COLUMNS,
    MIGRATIONS,
    SCHEMA_VERSION,
    SELECT,
    UPSERT,
    LedgerError,
    contribution_sql,
    from_row,
    tenant_salt,
    to_row,
)
from scer_proxy.ledger.sqlite import SqliteLedger
from scer_proxy.summary.build import summarize

NOW = time.time()


def make_record(i: int, *, rng: random.Random, started_at: float | None = None) -> Record:
    endpoint = rng.choice(["chat.completions", "chat.completions", "completions", "embeddings"])
    metered = rng.random() > 0.15
    energy = rng.uniform(1, 500) if metered else None
    return Record(
        request_id=f"scer-{i:08d}",
        model=rng.choice(["llama-8b", "llama-70b", "qwen-7b"]),
        upstream="up",
        tenant=rng.choice(["anonymous", "key-aaaa", "team-x"]),
        endpoint=endpoint,
        stream=rng.random() < 0.5,
        started_at=started_at if started_at is not None else NOW - rng.uniform(0, 3 * 86400),
        ended_at=NOW,
        status=rng.choice(["ok", "ok", "ok", "upstream_error", "cancelled", "running"]),
        http_status=200,
        prompt_tokens=rng.randint(1, 2000),
        completion_tokens=0 if endpoint == "embeddings" else rng.randint(0, 1000),
        token_source="upstream",
        energy_j=energy,
        energy_gpu_j=energy / 1.2 if energy else None,
        energy_prefill_j=energy / 3 if energy else None,
        energy_decode_j=energy * 2 / 3 if energy else None,
        energy_idle_j=energy / 10 if energy else None,
        energy_source="simulated" if metered else "none",
        energy_uncertainty_rel=0.1 if metered else None,
        hardware_s=0.5,
        carbon_g=energy * 0.11 if energy else None,
        carbon_operational_g=energy * 0.1 if energy else None,
        carbon_embodied_g=energy * 0.01 if energy else None,
        grid_intensity_g_per_kwh=369.0,
        grid_source="static:USA",
        sci=1.0,
        settled=False,
        flags=("meter_error",) if rng.random() < 0.1 else (),
    )


def settle(r: Record, rng: random.Random) -> Record:
    if r.energy_j is None:
        return r
    energy = r.energy_j * rng.uniform(0.8, 1.2)
    return dataclasses.replace(
        r,
        energy_j=energy,
        carbon_g=energy * 0.11,
        carbon_operational_g=energy * 0.1,
        carbon_embodied_g=energy * 0.01,
        settled=True,
    )


def raw_records(path: Path) -> list[Record]:
    """The records as stored, read with a connection of our own (independent of the ledger's summary)."""
    conn = sqlite3.connect(path)
    try:
        return [from_row(row) for row in conn.execute(SELECT)]
    finally:
        conn.close()


def assert_summaries_equal(got: dict, want: dict) -> None:
    def close(a: object, b: object) -> None:
        if isinstance(a, float) or isinstance(b, float):
            assert a == pytest.approx(b, rel=1e-9, abs=1e-9)
        else:
            assert a == b

    assert (
        got["window"]["start"] == pytest.approx(want["window"]["start"]) if want["window"]["start"] else True
    )
    for key in want["totals"]:
        close(got["totals"][key], want["totals"][key])
    for section in ("models", "tenants"):
        assert len(got[section]) == len(want[section])
        for g, w in zip(got[section], want[section], strict=True):
            for key in w:
                close(g[key], w[key])


def test_columns_are_the_record_fields() -> None:
    assert set(COLUMNS) == {f.name for f in dataclasses.fields(Record)}


def test_sql_contribution_is_the_python_one() -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    for migration in MIGRATIONS:
        for statement in migration:
            conn.execute(statement)
    rollup = [row[1] for row in conn.execute("PRAGMA table_info(rollup)")]
    assert rollup[5:] == list(contribution_sql("")) == list(QUANTITIES)
    records = [make_record(i, rng=random.Random(i)) for i in range(200)]
    conn.executemany(UPSERT, [to_row(r) for r in records])
    exprs = ", ".join(contribution_sql("").values())
    for r in records:
        row = conn.execute(f"SELECT {exprs} FROM requests WHERE request_id = ?", (r.request_id,)).fetchone()
        assert row == pytest.approx(contribution(r)), r
    conn.close()


async def test_put_get_recent_before_and_after_flush(tmp_path: Path) -> None:
    rng = random.Random(1)
    ledger = SqliteLedger(tmp_path / "scer.db", flush_interval_s=60)
    await ledger.open()
    try:
        records = [make_record(i, rng=rng) for i in range(50)]
        for r in records:
            ledger.put(r)
        assert ledger.get(records[3].request_id) == records[3]  # pending, not yet written
        assert [r.request_id for r in ledger.recent(5)] == [r.request_id for r in records[-5:]][::-1]
        assert await ledger.flush()
        assert ledger.pending == 0 and len(ledger) == 50
        assert ledger.get(records[3].request_id) == records[3]  # from the database
        settled = settle(records[10], rng)
        ledger.put(settled)  # pending replacement of a stored record keeps its place
        recent = ledger.recent(50)
        assert [r.request_id for r in recent] == [r.request_id for r in records][::-1]
        assert recent[39] == settled
        more = [make_record(i, rng=rng) for i in range(50, 53)]
        for r in more:
            ledger.put(r)
        assert [r.request_id for r in ledger.recent(4)] == [
            more[2].request_id,
            more[1].request_id,
            more[0].request_id,
            records[-1].request_id,
        ]
        assert ledger.get("scer-nope") is None
    finally:
        await ledger.close()
    again = SqliteLedger(tmp_path / "scer.db")
    await again.open()
    try:
        assert again.get(records[10].request_id) == settled and len(again) == 53
    finally:
        await again.close()


async def test_summary_totals_equal_the_sum_of_the_records(tmp_path: Path) -> None:
    rng = random.Random(7)
    path = tmp_path / "scer.db"
    ledger = SqliteLedger(path, flush_interval_s=60)
    await ledger.open()
    try:
        records = {r.request_id: r for r in (make_record(i, rng=rng) for i in range(3000))}
        for r in records.values():
            ledger.put(r)
        assert await ledger.flush()
        # settled figures replace stored ones; some are written, some stay pending
        for i, rid in enumerate(list(records)[::3]):
            records[rid] = settle(records[rid], rng)
            if i % 2:
                records[rid] = dataclasses.replace(records[rid], status="ok", energy_source="dcgm")
            ledger.put(records[rid])
            if i == 500:
                assert await ledger.flush()
        assert ledger.pending > 0
        now = time.time()
        for since, model, tenant in [
            (None, None, None),
            (3600.0, None, None),
            (86400.0 + 1234.5, None, None),
            (None, "llama-8b", None),
            (7200.0, None, "team-x"),
            (None, "nope", None),
        ]:
            got = await ledger.summary(since, model, tenant, now=now)
            want = summarize(
                records.values(),
                start=None if since is None else now - since,
                end=now,
                model=model,
                tenant=tenant,
            )
            assert_summaries_equal(got, want)
        assert await ledger.flush()
        got = await ledger.summary(now=now)
        assert got["totals"]["requests"] == sum(1 for r in records.values() if r.status != "running")
        # independently of the rollup: the raw rows as stored
        stored = raw_records(path)
        assert {r.request_id: r for r in stored} == records
        assert_summaries_equal(got, summarize(stored, start=None, end=now))
        rows = await ledger.metrics_rows()
        assert sum(r["energy_j"] for r in rows) == pytest.approx(got["totals"]["energy_j"], rel=1e-9)
    finally:
        await ledger.close()


# The columns each old schema version had (what its migrations added), and the fields it lacked.
_ADDED_SINCE = {
    1: ("energy_uncertainty_rel", "energy_gpu_j", "grid_age_s", "energy_idle_j"),
    2: ("energy_idle_j",),
}


@pytest.mark.parametrize("version", sorted(_ADDED_SINCE))
async def test_migrates_an_old_database(tmp_path: Path, version: int) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for migration in MIGRATIONS[:version]:
        for statement in migration:
            conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {version}")
    old_columns = [row[1] for row in conn.execute("PRAGMA table_info(requests)") if row[1] != "seq"]
    assert set(old_columns) == set(COLUMNS) - set(_ADDED_SINCE[version])
    rng = random.Random(3)
    records = [
        dataclasses.replace(make_record(i, rng=rng), **dict.fromkeys(_ADDED_SINCE[version]))
        for i in range(200)
    ]
    conn.execute("BEGIN")
    for r in records:
        values = dict(zip(COLUMNS, to_row(r), strict=True))
        conn.execute(
            f"INSERT INTO requests ({', '.join(old_columns)}) VALUES ({', '.join('?' * len(old_columns))})",
            [values[c] for c in old_columns],
        )
    conn.execute("COMMIT")
    conn.close()
    ledger = SqliteLedger(path)
    await ledger.open()
    try:
        assert len(ledger) == 200
        now = time.time()
        assert_summaries_equal(await ledger.summary(now=now), summarize(records, start=None, end=now))
        old = ledger.get(records[5].request_id)
        assert old == records[5] and old is not None and old.energy_idle_j is None  # unknown, not zero
        # A new record keeps every field the new columns hold, the idle share among them.
        fresh = make_record(1000, rng=rng, started_at=now)
        assert fresh.energy_idle_j is not None and fresh.energy_idle_j > 0
        ledger.put(fresh)
        ledger.put(settle(records[5], rng))
        assert await ledger.flush()
    finally:
        await ledger.close()
    assert raw_records(path)[-1] == fresh
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    columns = [row[1] for row in conn.execute("PRAGMA table_info(requests)") if row[1] != "seq"]
    assert set(columns) == set(COLUMNS)
    conn.close()


async def test_newer_schema_and_bad_files_are_clear_errors(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(LedgerError, match="newer"):
        await SqliteLedger(path).open()
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    with pytest.raises(LedgerError, match=r"junk\.db"):
        await SqliteLedger(tmp_path / "junk.db").open()
    with pytest.raises(LedgerError, match="no such directory"):
        await SqliteLedger(tmp_path / "missing" / "scer.db").open()
    with pytest.raises(LedgerError, match="no such ledger database"):
        await SqliteLedger(tmp_path / "absent.db", read_only=True).open()


class Faults:
    """``before_write`` for the ledger: runs the statements queued here on the writer's connection."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(self, conn: sqlite3.Connection) -> None:
        while self.statements:
            conn.execute(self.statements.pop(0))


@pytest.mark.parametrize(
    ("fault", "undo", "message"),
    [
        ("PRAGMA max_page_count = 1", "PRAGMA max_page_count = 1073741823", "database or disk is full"),
        ("PRAGMA query_only = ON", "PRAGMA query_only = OFF", "readonly database"),
    ],
)
async def test_full_or_read_only_database_keeps_records_and_recovers(
    tmp_path: Path, fault: str, undo: str, message: str
) -> None:
    rng = random.Random(11)
    path = tmp_path / "scer.db"
    faults = Faults()
    ledger = SqliteLedger(path, flush_interval_s=0.02, max_pending=300, before_write=faults)
    await ledger.open()
    try:
        first = [make_record(i, rng=rng) for i in range(10)]
        for r in first:
            ledger.put(r)
        assert await ledger.flush()
        if "max_page_count" in fault:  # the file is as big as it may get: the next pages do not fit
            pages = sqlite3.connect(path).execute("PRAGMA page_count").fetchone()[0]
            fault = f"PRAGMA max_page_count = {pages}"
        faults.statements.append(fault)
        batch = [make_record(i, rng=rng) for i in range(10, 510)]  # rows big enough to need new pages
        for r in batch:
            ledger.put(r)
        assert not await ledger.flush()
        health = ledger.health()
        assert not health["healthy"] and message in health["last_error"]
        assert health["pending"] == 300 and health["dropped"] == 200  # oldest dropped beyond max_pending
        assert ledger.get(batch[-1].request_id) == batch[-1] and ledger.get(batch[0].request_id) is None
        summary = await ledger.summary(now=time.time())
        kept = first + batch[200:]
        assert summary["totals"] == summarize(kept, start=None, end=time.time())["totals"] | {
            k: pytest.approx(v)
            for k, v in summarize(kept, start=None, end=time.time())["totals"].items()
            if isinstance(v, float)
        }
        faults.statements.append(undo)
        assert await ledger.flush()
        health = ledger.health()
        assert health["healthy"] and health["last_error"] is None and health["pending"] == 0
        assert {r.request_id for r in raw_records(path)} == {r.request_id for r in kept}
    finally:
        await ledger.close()


async def test_retention_deletes_old_records_and_keeps_the_rollup_exact(tmp_path: Path) -> None:
    rng = random.Random(5)
    path = tmp_path / "scer.db"
    ledger = SqliteLedger(path, retention_days=1e6)  # the writer's own check (at open) deletes nothing
    await ledger.open()
    old = [make_record(i, rng=rng, started_at=NOW - 86400 * rng.uniform(1.01, 30)) for i in range(300)]
    new = [make_record(i, rng=rng, started_at=NOW - 86400 * rng.uniform(0, 0.99)) for i in range(300, 600)]
    try:
        for r in old + new:
            ledger.put(r)
        assert await ledger.flush()
        assert len(ledger) == 600
    finally:
        await ledger.close()
    ledger = SqliteLedger(path, retention_days=1.0, flush_interval_s=0.01)  # the check at open deletes
    await ledger.open()
    try:
        deadline = time.monotonic() + 10
        while len(ledger) != 300:
            assert time.monotonic() < deadline, len(ledger)
            await asyncio.sleep(0.01)
        assert {r.request_id for r in raw_records(path)} == {r.request_id for r in new}
        now = time.time()
        assert_summaries_equal(await ledger.summary(now=now), summarize(new, start=None, end=now))
        conn = sqlite3.connect(path)
        assert conn.execute("SELECT count(*) FROM rollup WHERE records = 0").fetchone()[0] == 0
        conn.close()
    finally:
        await ledger.close()


def test_tenant_salt_is_stable_private_and_checked(tmp_path: Path) -> None:
    db = tmp_path / "scer.db"
    salt = tenant_salt(db)
    assert len(salt) == 32 and tenant_salt(db) == salt
    mode = stat.S_IMODE((tmp_path / "scer.db.salt").stat().st_mode)
    assert mode == 0o600
    (tmp_path / "scer.db.salt").write_bytes(b"short")
    with pytest.raises(LedgerError, match="expected 32 bytes"):
        tenant_salt(db)
    with pytest.raises(LedgerError, match="cannot create"):
        tenant_salt(tmp_path / "missing" / "scer.db")
    assert tenant_salt(":memory:") != tenant_salt(":memory:")


async def test_salt_survives_restart_through_the_ledger(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "scer.db")
    await ledger.open()
    first = ledger.tenant_salt
    await ledger.close()
    ledger = SqliteLedger(tmp_path / "scer.db")
    await ledger.open()
    assert ledger.tenant_salt == first
    await ledger.close()


async def test_memory_path_uses_a_temporary_file(tmp_path: Path) -> None:
    ledger = SqliteLedger(":memory:")
    await ledger.open()
    record = make_record(1, rng=random.Random(2))
    ledger.put(record)
    assert await ledger.flush()
    assert ledger.get(record.request_id) == record and ledger.health()["healthy"]
    await ledger.close()


async def test_read_only_open_reads_without_writing(tmp_path: Path) -> None:
    path = tmp_path / "scer.db"
    ledger = SqliteLedger(path)
    await ledger.open()
    records = [make_record(i, rng=random.Random(i)) for i in range(20)]
    for r in records:
        ledger.put(r)
    await ledger.close()
    before = path.stat().st_mtime_ns
    reader = SqliteLedger(path, read_only=True)
    await reader.open()
    try:
        now = time.time()
        assert_summaries_equal(reader.summary_sync(now=now), summarize(records, start=None, end=now))
        reader.put(records[0])  # never written: no writer in read-only mode
        assert reader.health()["healthy"]
    finally:
        await reader.close()
    assert path.stat().st_mtime_ns == before
