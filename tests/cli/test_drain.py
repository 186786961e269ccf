"""SIGTERM's drain takes ``server.shutdown_timeout_s`` in all, with ``scer-proxy serve`` as a process in
front of an upstream that holds a stream open: the process exits within the timeout (and a margin for
the interpreter's own exit), and the cut request's record is in the database."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from pathlib import Path

import httpx

from scer_proxy.proxy.serving import free_port
from tests.fake_upstream import MODEL
from tests.servers import ThreadedServers, spawn_cli, wait_ready

SHUTDOWN_TIMEOUT_S = 3.0
MARGIN_S = 4.0  # the interpreter's exit and a busy machine; aiohttp's own drain took 2 x 30 s


async def test_sigterm_drains_within_shutdown_timeout_and_keeps_the_cut_record(
    tmp_path: Path, servers: ThreadedServers, fake_upstream: str
) -> None:
    port, db = free_port(), tmp_path / "scer.db"
    config = tmp_path / "config.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\nshutdown_timeout_s = {SHUTDOWN_TIMEOUT_S}\n'
        f'[meter]\nkind = "estimate"\n[storage]\npath = "{db}"\n'
        f'[[upstreams]]\nname = "fake"\nurl = "{fake_upstream}"\n'
    )
    log = tmp_path / "proxy.log"
    proxy = spawn_cli(["serve", "--config", str(config)], log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/scer/health", proxy, log)
        async with httpx.AsyncClient(timeout=30.0) as client:
            request = client.build_request(
                "POST",
                f"{url}/v1/chat/completions",
                json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
                headers={"X-Fake-Scenario": "hold"},  # two events, then the upstream holds the stream
            )
            response = await client.send(request, stream=True)
            rid = response.headers["X-SCER-Request-Id"]
            chunks = response.aiter_raw()
            assert b"data:" in await anext(chunks)  # in flight: the first events have come through

            proxy.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            code = await asyncio.to_thread(proxy.wait, SHUTDOWN_TIMEOUT_S + MARGIN_S)
            took_s = time.monotonic() - signalled
            await response.aclose()
        assert code == 0
        assert took_s < SHUTDOWN_TIMEOUT_S + MARGIN_S
        assert took_s >= SHUTDOWN_TIMEOUT_S * 0.5, "the request in flight was given its time"
    finally:
        if proxy.poll() is None:
            proxy.kill()
            proxy.wait(10)
        await asyncio.to_thread(httpx.post, f"{fake_upstream}/release")

    conn = sqlite3.connect(db)
    try:
        row = conn.execute("SELECT status FROM requests WHERE request_id = ?", (rid,)).fetchone()
    finally:
        conn.close()
    assert row is not None, "the record of the request cut by the drain reached the database"
    events = [json.loads(line)["event"] for line in log.read_text().splitlines() if line.startswith("{")]
    assert "drain_timeout" in events and events[-1] == "stopped"
