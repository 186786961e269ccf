"""Durability with real processes: the simulator and ``scer-proxy serve --db`` as subprocesses.

SIGTERM while requests are in flight: every request that got a response has its record after exit.
kill -9 after a burst: only records finished within the last flush interval may be missing.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from scer_proxy.proxy.serving import free_port
from tests.servers import spawn_cli, wait_ready

FLUSH_INTERVAL_S = 0.2
MARGIN_S = 0.3  # a flush transaction's own time, scheduling on a busy 2-core machine


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    sim_port, proxy_port = free_port(), free_port()
    sim = spawn_cli(
        ["simulate", "--listen", f"127.0.0.1:{sim_port}", "--time-scale", "20"], tmp_path / "sim.log"
    )
    db = tmp_path / "scer.db"
    proxy = None
    try:
        wait_ready(f"http://127.0.0.1:{sim_port}/v1/models", sim, tmp_path / "sim.log")
        proxy = spawn_cli(
            [
                "serve",
                "--upstream",
                f"http://127.0.0.1:{sim_port}",
                "--meter",
                "simulated",
                "--db",
                str(db),
                "--listen",
                f"127.0.0.1:{proxy_port}",
            ],
            tmp_path / "proxy.log",
        )
        wait_ready(f"http://127.0.0.1:{proxy_port}/scer/health", proxy, tmp_path / "proxy.log")
        yield f"http://127.0.0.1:{proxy_port}", proxy, db
    finally:
        for proc in (proxy, sim):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


def stored_ids(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {row[0] for row in conn.execute("SELECT request_id FROM requests")}
    finally:
        conn.close()


async def one_request(client: httpx.AsyncClient, url: str, max_tokens: int) -> tuple[str, float] | None:
    """POST a chat completion; the ledger id and the time its response completed, or None on failure."""
    try:
        resp = await client.post(
            url + "/v1/chat/completions",
            json={
                "model": "meta-llama/Llama-3.1-8B-Instruct",
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "messages": [{"role": "user", "content": "Tell me about energy."}],
            },
        )
    except httpx.HTTPError:
        return None
    if resp.status_code != 200:
        return None
    return resp.headers["X-SCER-Request-Id"], time.time()


async def test_sigterm_drains_in_flight_requests_and_flushes(
    stack: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    url, proxy, db = stack
    async with httpx.AsyncClient(timeout=30.0) as client:
        warm = [await one_request(client, url, 8) for _ in range(3)]
        tasks = [asyncio.create_task(one_request(client, url, 1500 + 50 * i)) for i in range(16)]
        await asyncio.sleep(0.3)  # all 16 are being generated (over a second each at 20x)
        assert not any(t.done() for t in tasks)
        proxy.send_signal(signal.SIGTERM)
        results = await asyncio.gather(*tasks)
    assert await asyncio.to_thread(proxy.wait, 20) == 0
    answered = [r[0] for r in [*warm, *results] if r is not None]
    assert len(answered) == 19, "every in-flight request is drained, not cut"
    assert set(answered) <= stored_ids(db)
    # The serve command tuned the collector once its start-up was done (and said so).
    lines = [
        json.loads(line)
        for line in (db.parent / "proxy.log").read_text().splitlines()
        if line.startswith("{")
    ]
    listening = next(line for line in lines if line.get("event") == "listening")
    assert listening["gc_young_threshold"] == 10_000 and listening["gc_frozen_objects"] > 1000


async def test_kill_9_loses_at_most_the_last_flush_interval(
    stack: tuple[str, subprocess.Popen[bytes], Path],
) -> None:
    url, proxy, db = stack
    done: list[tuple[str, float]] = []

    stop = asyncio.Event()

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            result = await one_request(client, url, 4)
            if result is not None:
                done.append(result)

    async with httpx.AsyncClient(timeout=10.0) as client:
        loops = [asyncio.create_task(client_loop(client)) for _ in range(8)]
        await asyncio.sleep(1.5)
        killed_at = time.time()
        proxy.kill()  # SIGKILL in the middle of the burst: no shutdown code runs
        await asyncio.to_thread(proxy.wait, 10)
        # The loops end on their own once their request fails: a task cancelled inside anyio's connect
        # can leave its new socket to the garbage collector.
        stop.set()
        await asyncio.gather(*loops)
    stored = stored_ids(db)
    old_enough = [rid for rid, at in done if at < killed_at - FLUSH_INTERVAL_S - MARGIN_S]
    assert len(old_enough) > 20
    missing = [rid for rid in old_enough if rid not in stored]
    assert not missing, f"{len(missing)} of {len(old_enough)} records older than one flush interval were lost"
    recent_missing = [rid for rid, _ in done if rid not in stored]
    print(
        f"responses {len(done)}, stored {len(stored)}, missing (all within the last interval) "
        f"{len(recent_missing)}"
    )
