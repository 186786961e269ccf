"""Serving an aiohttp application on a host and port (0 for a free one): the one place that does it."""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
from collections.abc import Callable

from aiohttp import web

from scer_proxy.wire import tokens


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a server started in another process (which binds it itself;
    a server in this process should bind port 0 and read the port back instead)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def preload_tokenizer(_app: web.Application) -> None:
    """An ``on_startup`` hook: load the bundled tokenizer in a worker thread. Loading takes a few hundred
    ms, which the first request that counts tokens would otherwise spend blocking the event loop (and
    every request behind it)."""
    await asyncio.get_running_loop().run_in_executor(None, tokens.encoding)


async def wait_for_signal() -> None:
    """Return on SIGINT or SIGTERM (a server's main task waits here, then shuts down in order)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


# The collector's first threshold: allocations (less deallocations) of container objects between two young
# collections. CPython's default, 700, makes the proxy run a young collection every few requests; each
# walks the young objects and finds almost nothing to free (request objects die by reference count).
# Timed with gc.callbacks under 64 concurrent clients, the collector took about 6 % of the proxy's time,
# with pauses of up to 40 ms when the old generation was walked (docs/performance.md, "The collector tuning").
GC_YOUNG_THRESHOLD = 10_000


def tune_gc_for_serving() -> tuple[int, int]:
    """For a long-running server process, once its start-up is done: move everything alive now (modules,
    the tokenizer, the configuration) out of the collector's reach (``gc.freeze``), so that old-generation
    collections walk only what the serving created, and collect the young generation less often.

    Process-wide, so only the ``serve`` command calls it (never a test process, whose leak checks rely on
    the collector). Returns the objects frozen and the young threshold set.
    """
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)
    return gc.get_freeze_count(), GC_YOUNG_THRESHOLD


async def serve_app(
    app: web.Application, host: str = "127.0.0.1", port: int = 0, *, shutdown_timeout: float = 30.0
) -> tuple[web.AppRunner, str]:
    """Start ``app`` with handler cancellation on (a client that goes away cancels its handler); returns
    the runner (``await runner.cleanup()`` to stop) and the base URL with the port actually bound."""
    runner = web.AppRunner(
        app,
        handle_signals=False,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=shutdown_timeout,
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sockets = runner.addresses
    bound_port = sockets[0][1] if sockets else port
    shown = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown}:{bound_port}"


async def serve_until_signal(
    app: web.Application,
    host: str,
    port: int,
    *,
    shutdown_timeout: float = 30.0,
    on_started: Callable[[], object] | None = None,
) -> None:
    """Serve ``app`` (as :func:`serve_app`) until SIGINT or SIGTERM, then shut it down: a helper server's life."""
    runner, _url = await serve_app(app, host, port, shutdown_timeout=shutdown_timeout)
    if on_started is not None:
        on_started()
    try:
        await wait_for_signal()
    finally:
        await runner.cleanup()
