"""What one client connection may hold, with raw sockets against the proxy started as ``serve`` starts it
(``start_proxy``, which builds the client limits from the ``server`` keys): a request head must arrive
whole within ``header_timeout_s``, an idle keep-alive connection is closed after
``keepalive_timeout_s``, and a request on a connection beyond ``max_connections`` is answered 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from scer_proxy.cli.serve import start_proxy
from scer_proxy.config import Config, load_config
from scer_proxy.proxy.serving import GuardedRunner, drain

HEALTH = b"GET /scer/health HTTP/1.1\r\nHost: proxy\r\n\r\n"
WAIT_S = 10.0  # the most any step waits: far above the timeouts under test, far below "never"


def _config(**server: Any) -> Config:
    return load_config(
        overrides={
            "server": {"listen": "127.0.0.1:0", **server},
            "meter": {"kind": "estimate"},
            "storage": {"path": ":memory:"},
        },
        upstream_url="http://127.0.0.1:9",
    )


@contextlib.asynccontextmanager
async def proxy(**server: Any) -> AsyncIterator[tuple[int, GuardedRunner]]:
    runner, url = await start_proxy(_config(**server))
    try:
        yield int(url.rsplit(":", 1)[1]), runner
    finally:
        await drain(runner)


async def closed_after(reader: asyncio.StreamReader, started: float) -> tuple[float, bytes]:
    """Read until the server closes the connection; the seconds since ``started`` and what it sent."""
    data = b""
    try:
        async with asyncio.timeout(WAIT_S):
            while chunk := await reader.read(65536):
                data += chunk
    except ConnectionResetError:
        pass
    return time.monotonic() - started, data


async def response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body: status, headers (lower case), body."""
    async with asyncio.timeout(WAIT_S):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)
        }
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


async def test_a_head_dribbled_byte_by_byte_is_cut_after_the_header_timeout() -> None:
    async with proxy(header_timeout_s=0.6) as (port, runner):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(b"GET /scer/health HTTP/1.1\r\nHost: proxy\r\n")

        async def dribble() -> None:  # slowloris: a header byte every 50 ms, never the blank line
            with contextlib.suppress(ConnectionError):
                for _ in range(400):
                    writer.write(b"X")
                    await writer.drain()
                    await asyncio.sleep(0.05)

        sender = asyncio.create_task(dribble())
        elapsed, data = await closed_after(reader, started)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        writer.close()
        assert data == b"", "no request could be read, so nothing is answered"
        assert 0.5 <= elapsed < WAIT_S, elapsed
        assert runner.connections.head_timeouts == 1

        # A connection that sends nothing at all is closed the same way.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        elapsed, data = await closed_after(reader, time.monotonic())
        writer.close()
        assert data == b"" and elapsed < WAIT_S
        assert runner.connections.head_timeouts == 2


async def test_a_slow_request_body_is_not_a_slow_head() -> None:
    async with proxy(header_timeout_s=0.4) as (port, runner):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = b'{"not": "a submission"}'
        writer.write(
            b"POST /scer/submissions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        for i in range(len(body)):  # the body over about 1.1 s, well past the header timeout
            writer.write(body[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0.05)
        status, _headers, answer = await response(reader)
        writer.close()
        assert status == 400 and "error" in orjson.loads(answer)
        assert runner.connections.head_timeouts == 0


async def test_an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout() -> None:
    async with proxy(header_timeout_s=0.3, keepalive_timeout_s=1.2) as (port, _runner):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEALTH)
        assert (await response(reader))[0] == 200
        # Idle past the header timeout: the keep-alive timeout applies between requests, not that one.
        await asyncio.sleep(0.6)
        writer.write(HEALTH)
        assert (await response(reader))[0] == 200
        elapsed, data = await closed_after(reader, time.monotonic())
        writer.close()
        assert data == b""
        assert 1.0 <= elapsed < WAIT_S, elapsed


async def test_connections_beyond_max_connections_are_answered_503() -> None:
    async with proxy(max_connections=3, keepalive_timeout_s=30) as (port, runner):
        held = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(HEALTH)
            assert (await response(reader))[0] == 200
            held.append((reader, writer))

        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEALTH)
        status, headers, body = await response(reader)
        assert status == 503
        assert headers["content-type"].startswith("application/json")
        assert headers["connection"].lower() == "close" and headers["retry-after"] == "1"
        error = orjson.loads(body)["error"]
        assert error["type"] == "server_error" and error["code"] == "too_many_connections"
        _elapsed, rest = await closed_after(reader, time.monotonic())
        writer.close()
        assert rest == b"", "the refused connection is closed after its answer"
        assert runner.connections.refused == 1

        # One held connection goes away: a new one is served again.
        held.pop()[1].close()
        for _ in range(int(WAIT_S / 0.01)):
            if len(runner.connections.open) <= 2:
                break
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEALTH)
        assert (await response(reader))[0] == 200
        writer.close()
        for _reader, held_writer in held:
            held_writer.close()
