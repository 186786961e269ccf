"""Serving an aiohttp application on a host and port (0 for a free one): the one place that does it.

What a client connection may hold is bounded here (aiohttp bounds none of it by default): its request
head must arrive whole within ``header_timeout_s`` (aiohttp has no such timeout: a client dribbling
header bytes, or sending none, held its socket for ever), an idle keep-alive connection is closed after
``keepalive_timeout_s``, and a request on a connection beyond ``max_connections`` open ones is answered
503. A SIGTERM's drain (:func:`drain`) takes ``shutdown_timeout_s`` in all.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from scer_proxy.wire import openai as wire
from scer_proxy.wire import tokens

log = structlog.get_logger("scer_proxy.serving")


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


@dataclass(frozen=True)
class ClientLimits:
    """What client connections may hold (the ``server.*`` keys of the same names)."""

    header_timeout_s: float = 10.0
    keepalive_timeout_s: float = 75.0
    max_connections: int = 4096
    shutdown_timeout_s: float = 25.0


class Connections:
    """The open client connections of one server and the requests in flight on them (for the cap and
    the drain), with counts for tests and logs."""

    def __init__(self, limits: ClientLimits) -> None:
        self.limits = limits
        self.open: set[GuardedProtocol] = set()
        self.in_flight = 0
        self.refused = 0  # connections beyond max_connections (their requests are answered 503)
        self.head_timeouts = 0  # connections closed because a request head did not arrive in time
        self._idle = asyncio.Event()
        self._idle.set()
        self._warned_at = -1e9

    def opened(self, protocol: GuardedProtocol) -> bool:
        """Count a new connection; False when it is beyond the cap."""
        self.open.add(protocol)
        if len(self.open) <= self.limits.max_connections:
            return True
        self.refused += 1
        now = time.monotonic()
        if now - self._warned_at >= 10.0:  # at most one line every 10 s under a flood
            self._warned_at = now
            log.warning(
                "client_connections_over_limit",
                max_connections=self.limits.max_connections,
                refused=self.refused,
            )
        return False

    def closed(self, protocol: GuardedProtocol) -> None:
        self.open.discard(protocol)

    def request_started(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def request_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Until no request is in flight (True) or ``timeout_s`` passed (False)."""
        try:
            async with asyncio.timeout(max(0.0, timeout_s)):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def close_idle(self) -> None:
        """Close every connection with no request in flight (the drain: keep-alive ones would otherwise
        wait for a next request that is never read)."""
        for protocol in list(self.open):
            if not protocol.busy:
                protocol.force_close()


async def _too_many_connections(_request: web.BaseRequest) -> web.StreamResponse:
    """The answer to every request on a connection beyond ``server.max_connections``; then it closes."""
    response = web.Response(
        status=503,
        body=wire.error_body(
            "The proxy has too many open connections; retry later.",
            "server_error",
            code="too_many_connections",
        ),
        content_type="application/json",
        headers={"Retry-After": "1"},
    )
    response.force_close()
    return response


class GuardedProtocol(RequestHandler):
    """aiohttp's connection protocol, with a request-head timeout and the connection cap.

    The head timer runs from the connection's start (its first head) and from the first byte of each
    later head, and stops when the head is parsed; bytes of a request body never start it. When it fires
    on a connection with no request in flight, the connection is closed: no request could be read, so
    there is no one to answer."""

    __slots__ = ("_body", "_connections", "_head_timer", "in_flight")

    def __init__(self, manager: web.Server, connections: Connections, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._connections = connections
        self._head_timer: asyncio.TimerHandle | None = None
        self._body: Any = None  # the payload of the newest request head parsed
        self.in_flight = False

    @property
    def busy(self) -> bool:
        """A request is being answered, or read whole and waiting its turn."""
        return self.in_flight or bool(self._messages)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._connections.opened(self):
            self._request_handler = _too_many_connections
        super().connection_made(transport)
        self._start_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        self._connections.closed(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        between_requests = self._body is None or self._body.is_eof()  # so these bytes are of a head
        queued = len(self._messages)
        super().data_received(data)
        if len(self._messages) > queued:
            self._body = self._messages[-1][1]
            self._stop_head_timer()
        elif data and between_requests and not self._upgraded:
            self._start_head_timer()

    def _start_head_timer(self) -> None:
        if self._head_timer is None and self.transport is not None:
            self._head_timer = self._loop.call_later(
                self._connections.limits.header_timeout_s, self._head_timed_out
            )

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.busy:
            return  # a request is being answered: its next head, if any, is timed from its next bytes
        self._connections.head_timeouts += 1
        self.force_close()

    async def _handle_request(
        self,
        request: web.BaseRequest,
        start_time: float | None,
        request_handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
    ) -> tuple[web.StreamResponse, bool]:
        self.in_flight = True
        self._connections.request_started()
        try:
            return await super()._handle_request(request, start_time, request_handler)
        finally:
            self.in_flight = False
            self._connections.request_finished()


class _GuardedServer(web.Server):
    """aiohttp's low-level server, making a :class:`GuardedProtocol` for each connection."""

    guard: Connections

    def __call__(self) -> RequestHandler:
        return GuardedProtocol(self, self.guard, loop=self._loop, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """An ``AppRunner`` whose connections are guarded (:class:`GuardedProtocol`) and whose :func:`drain`
    takes ``limits.shutdown_timeout_s`` in all."""

    def __init__(self, app: web.Application, limits: ClientLimits, **kwargs: Any) -> None:
        # aiohttp's own shutdown waits up to its timeout for handlers, then as long again once it has
        # cancelled them; :func:`drain` has already waited, so it gets only the cancellation's grace.
        super().__init__(
            app, keepalive_timeout=limits.keepalive_timeout_s, shutdown_timeout=_grace_s(limits), **kwargs
        )
        self.limits = limits
        self.connections = Connections(limits)

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _GuardedServer  # the same server; only the protocol it makes changes
        guarded = cast(_GuardedServer, server)
        guarded.guard = self.connections
        return guarded


def _reserve_s(limits: ClientLimits) -> float:
    """The end of the drain kept for cancelling what is still running and flushing the ledger."""
    return min(5.0, limits.shutdown_timeout_s * 0.2)


def _grace_s(limits: ClientLimits) -> float:
    """How long a cancelled handler may take to finish (twice: aiohttp's shutdown waits in two steps)."""
    return _reserve_s(limits) / 5.0


async def drain(runner: GuardedRunner) -> None:
    """Stop the server in ``shutdown_timeout_s`` in all: stop accepting, close idle connections, let the
    requests in flight finish until the reserve (a fifth of the timeout, at most 5 s) is left, cancel
    those still running (their records close as cancelled), then run the app's cleanup (the ledger's
    final flush)."""
    loop = asyncio.get_running_loop()
    limits = runner.limits
    deadline = loop.time() + limits.shutdown_timeout_s
    for site in list(runner.sites):
        await site.stop()
    runner.connections.close_idle()
    drained = await runner.connections.wait_idle(deadline - _reserve_s(limits) - loop.time())
    if not drained:
        log.warning(
            "drain_timeout", cancelled=runner.connections.in_flight, timeout_s=limits.shutdown_timeout_s
        )
    await runner.cleanup()


async def serve_app(
    app: web.Application,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    limits: ClientLimits | None = None,
) -> tuple[GuardedRunner, str]:
    """Start ``app`` with handler cancellation on (a client that goes away cancels its handler) and
    guarded connections (``limits``, default :class:`ClientLimits`); returns the runner (``await
    drain(runner)`` to stop, or ``runner.cleanup()``) and the base URL with the port actually bound."""
    runner = GuardedRunner(
        app,
        limits or ClientLimits(),
        handle_signals=False,
        handler_cancellation=True,
        access_log=None,
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
    """Serve ``app`` (as :func:`serve_app`) until SIGINT or SIGTERM, then drain it in ``shutdown_timeout``
    seconds: a helper server's life."""
    runner, _url = await serve_app(app, host, port, limits=ClientLimits(shutdown_timeout_s=shutdown_timeout))
    if on_started is not None:
        on_started()
    try:
        await wait_for_signal()
    finally:
        await drain(runner)
