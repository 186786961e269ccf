"""Faults of the database file itself: deleted or replaced while serving (detected, recreated, records
in memory written anew, health degraded), corrupt at start (refused with one line, or moved aside), and
the writer task dying (health degraded, never a silent ``ok``)."""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import structlog

from scer_proxy.ledger.schema import SCHEMA_VERSION, LedgerError
from scer_proxy.ledger.sqlite import SqliteLedger
from tests.cli.test_errors import failure
from tests.conftest import proxy_config
from tests.fake_upstream import MODEL
from tests.ledger.test_ledger import make_record
from tests.servers import ThreadedServers

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def stored(path: Path) -> dict[str, str]:
    """request id -> status of the records in the database file at ``path`` (a fresh connection)."""
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        return dict(conn.execute("SELECT request_id, status FROM requests").fetchall())
    finally:
        conn.close()


def wait_for(predicate: Callable[[], bool], seconds: float = 15.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


@pytest.mark.parametrize("remove", ["the file", "the file, its -wal and -shm"])
def test_database_deleted_while_serving_is_recreated_and_health_degrades(
    tmp_path: Path, servers: ThreadedServers, fake_upstream: str, start_proxy: Callable[..., str], remove: str
) -> None:
    db = tmp_path / "scer.db"
    config = proxy_config(
        fake_upstream, storage={"path": str(db), "flush_interval_ms": 20}, meter={"kind": "estimate"}
    )
    proxy = start_proxy(config=config)

    def health() -> dict:
        return httpx.get(f"{proxy}/scer/health").json()

    before = httpx.post(f"{proxy}/v1/chat/completions", json=CHAT).headers["X-SCER-Request-Id"]
    wait_for(lambda: before in stored(db))
    assert health()["status"] == "ok"

    salt = Path(f"{db}.salt").read_bytes()
    os.remove(db)
    if remove != "the file":
        for suffix in ("-wal", "-shm", ".salt"):  # rm scer.db*
            os.remove(f"{db}{suffix}")
    after = [
        httpx.post(f"{proxy}/v1/chat/completions", json=CHAT).headers["X-SCER-Request-Id"] for _ in range(5)
    ]
    wait_for(lambda: db.exists() and set(after) <= set(stored(db)))

    body = health()
    assert body["status"] == "degraded" and body["ledger"]["healthy"] is False
    assert body["ledger"]["recreated"] == 1 and body["ledger"]["recreated_at"] is not None
    # The new database is whole and goes on taking records; reads come from it.
    more = httpx.post(f"{proxy}/v1/chat/completions", json=CHAT).headers["X-SCER-Request-Id"]
    wait_for(lambda: more in stored(db))
    assert httpx.get(f"{proxy}/scer/requests/{after[0]}").status_code == 200
    listed = {r["request_id"] for r in httpx.get(f"{proxy}/scer/requests?limit=50").json()["data"]}
    assert set(after) | {more} <= listed
    assert health()["ledger"]["recreated"] == 1, "detected once, not at every flush"
    assert Path(f"{db}.salt").read_bytes() == salt, "tenants keep their hashes across a restart"


async def test_database_replaced_while_serving_writes_to_the_new_file(tmp_path: Path) -> None:
    path = tmp_path / "scer.db"
    ledger = SqliteLedger(path, flush_interval_s=0.02)
    await ledger.open()
    rng = random.Random(3)
    try:
        ledger.put(make_record(1, rng=rng))
        assert await ledger.flush()
        os.rename(path, tmp_path / "old.db")  # moved away (a rotation): another file takes the path
        os.rename(f"{path}-wal", tmp_path / "old.db-wal")
        os.rename(f"{path}-shm", tmp_path / "old.db-shm")
        ledger.put(make_record(2, rng=rng))
        assert await ledger.flush()
        assert set(stored(path)) == {"scer-00000002"}
        assert ledger.health()["recreated"] == 1 and not ledger.health()["healthy"]
        assert ledger.get("scer-00000002") is not None
    finally:
        await ledger.close()


def test_a_corrupt_database_at_start_is_refused_with_one_line_naming_the_key(tmp_path: Path) -> None:
    corrupt = tmp_path / "scer.db"
    corrupt.write_bytes(b"not a database at all" * 100)
    line = failure("serve", 2, "--db", str(corrupt), "--meter", "estimate", "--listen", "127.0.0.1:0")
    assert line.startswith("storage.path: cannot open ledger database") and "not a database" in line
    assert 'storage.on_corrupt = "move-aside"' in line, "the line says how to start anyway"
    assert corrupt.read_bytes() == b"not a database at all" * 100, "refuse leaves the file alone"


async def test_move_aside_renames_a_corrupt_database_and_starts_a_new_one(tmp_path: Path) -> None:
    path = tmp_path / "scer.db"
    junk = b"not a database at all" * 100
    path.write_bytes(junk)
    with pytest.raises(LedgerError, match="not a database"):
        await SqliteLedger(path).open()
    ledger = SqliteLedger(path, on_corrupt="move-aside", flush_interval_s=0.02)
    with structlog.testing.capture_logs() as logs:
        await ledger.open()
    try:
        (aside,) = await asyncio.to_thread(lambda: list(tmp_path.glob("scer.db.corrupt-*")))
        assert await asyncio.to_thread(aside.read_bytes) == junk
        (warning,) = [e for e in logs if e["event"] == "ledger_corrupt_moved_aside"]
        assert warning["log_level"] == "warning" and warning["moved_to"] == str(aside)
        ledger.put(make_record(7, rng=random.Random(7)))
        assert await ledger.flush()
        assert set(stored(path)) == {"scer-00000007"}
        assert ledger.health()["healthy"]
    finally:
        await ledger.close()


async def test_a_dead_writer_task_makes_the_ledger_unhealthy(tmp_path: Path) -> None:
    ledger = SqliteLedger(tmp_path / "scer.db", flush_interval_s=0.02)
    await ledger.open()
    try:
        assert ledger.health()["healthy"]
        task = ledger._writer._task
        assert task is not None
        ledger.put(make_record(1, rng=random.Random(1)))
        task.cancel()  # as any error nothing caught would end it
        await asyncio.gather(task, return_exceptions=True)
        health = ledger.health()
        assert health["healthy"] is False and "writer task" in health["last_error"]
    finally:
        await ledger.close()
    assert set(stored(tmp_path / "scer.db")) == {"scer-00000001"}, "close wrote what the dead task left"


async def test_an_unexpected_error_in_a_write_keeps_the_records_and_degrades_health(tmp_path: Path) -> None:
    broken = True

    def before_write(_conn: sqlite3.Connection) -> None:
        if broken:
            raise RuntimeError("a bug, not a fault of the medium")

    path = tmp_path / "scer.db"
    ledger = SqliteLedger(path, flush_interval_s=0.02, before_write=before_write)
    await ledger.open()
    try:
        ledger.put(make_record(1, rng=random.Random(1)))
        assert not await ledger.flush()
        health = ledger.health()
        assert (
            health["healthy"] is False and "RuntimeError" in health["last_error"] and health["pending"] == 1
        )
        broken = False
        assert await ledger.flush()
        assert set(stored(path)) == {"scer-00000001"} and ledger.health()["healthy"]
    finally:
        await ledger.close()
