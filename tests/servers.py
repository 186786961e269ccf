"""Real servers for tests: run aiohttp applications on loopback port 0, never a mocked wire.

``ThreadedServers`` runs one event loop in a background thread and serves any number of aiohttp
applications from it, so that synchronous clients (the sync openai client, httpx) and asynchronous
clients on the test's own loop can both reach them. ``spawn_cli`` runs ``scer-proxy`` commands as
the processes they are deployed as.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]

T = TypeVar("T")


async def start_site(
    app: web.Application, host: str = "127.0.0.1", *, handler_cancellation: bool = False
) -> tuple[web.AppRunner, str]:
    """Start ``app`` on an ephemeral port of the current loop; returns the runner and its base URL."""
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=2.0,
        handler_cancellation=handler_cancellation,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    return runner, f"http://{host}:{port}"


class ThreadedServers:
    """An event loop in a thread that hosts aiohttp applications for the duration of a test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-servers", daemon=True)
        self._thread.start()
        self._runners: list[web.AppRunner] = []

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the servers' loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(
        self,
        make_app: Callable[[], web.Application | Awaitable[web.Application]],
        *,
        handler_cancellation: bool = False,
    ) -> str:
        """Build the app on the servers' loop (so its resources belong to it) and serve it; returns its URL."""

        async def _start() -> str:
            app = make_app()
            if not isinstance(app, web.Application):
                app = await app
            runner, url = await start_site(app, handler_cancellation=handler_cancellation)
            self._runners.append(runner)
            return url

        return self.call(_start())

    def close(self) -> None:
        async def _stop() -> None:
            for runner in reversed(self._runners):
                await runner.cleanup()
            # End the loop as asyncio.run does: cancel what is left, then give the transports closed above
            # the loop iterations in which they release their sockets (a socket left to the garbage
            # collector warns, at random, in a later test), and close async generators and the executor.
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for _ in range(3):
                await asyncio.sleep(0)
            await self.loop.shutdown_asyncgens()
            await self.loop.shutdown_default_executor()

        try:
            self.call(_stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def spawn_cli(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m scer_proxy ARGS`` in its own process, stdout and stderr to ``log``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "scer_proxy", *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 15.0) -> None:
    """Until ``url`` answers below 500; fails with the process's log if it exits or never answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} not ready: {log.read_text()}")
