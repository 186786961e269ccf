"""Non-streamed bodies are held up to ``server.max_response_bytes``, decompressed copies too (issue 14).

A body was held whole however large (200 MB: RSS 89 to 685 MiB), and a compressed one decompressed on
the event loop without a limit (a 1 MB gzip of 1 GiB stalled the loop 9.4 s). Past the limit, raw or
decompressed, the proxy answers 502 in the OpenAI shape and flags the record
``upstream_response_too_large``.
"""

from __future__ import annotations

import functools
import gzip
import resource
import socket
import threading
import zlib
from collections.abc import Callable

import httpx
import orjson
import pytest
from aiohttp import web

from scer_proxy.config import ConfigError, load_config
from scer_proxy.proxy.bodies import ResponseTooLarge, decode_capped
from tests.fake_upstream import CHAT_BODY, MODEL
from tests.proxy.raw_http import RawUpstream, Seen, chunk
from tests.servers import ThreadedServers

LIMIT = 1 << 20  # 1 MiB, so that the tests are quick
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
BOMB_BYTES = 300 * (1 << 20)


@functools.cache
def gzip_bomb() -> bytes:
    """About 300 KB of gzip that expands to 300 MiB of zeros."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = bytes(1 << 20)
    parts = [compressor.compress(block) for _ in range(BOMB_BYTES // len(block))]
    return b"".join([*parts, compressor.flush()])


def _upstream() -> web.Application:
    async def chat(request: web.Request) -> web.Response:
        await request.read()
        scenario = request.headers.get("X-Scenario", "")
        if scenario == "bomb":
            return web.Response(
                body=gzip_bomb(), headers={"Content-Encoding": "gzip"}, content_type="application/json"
            )
        if scenario == "big":
            return web.Response(body=b" " * (2 * LIMIT) + CHAT_BODY, content_type="application/json")
        if scenario == "gzip":
            return web.Response(
                body=gzip.compress(CHAT_BODY),
                headers={"Content-Encoding": "gzip"},
                content_type="application/json",
            )
        return web.Response(body=CHAT_BODY, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


def _chunked_big(conn: socket.socket, seen: Seen, stop: threading.Event) -> None:
    """2 MiB in chunks, without a Content-Length: only a running count can stop it."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    try:
        for _ in range(32):
            conn.sendall(chunk(b" " * 65536))
        conn.sendall(chunk(CHAT_BODY) + b"0\r\n\r\n")
    except OSError:
        pass  # the proxy stopped reading and closed the connection


def _assert_too_large(proxy: str, resp: httpx.Response) -> None:
    assert resp.status_code == 502
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "upstream_response_too_large"
    record = httpx.get(f"{proxy}/scer/requests/{resp.headers['x-scer-request-id']}").json()
    assert record["status"] == "error" and "upstream_response_too_large" in record["flags"]


@pytest.mark.parametrize("scenario", ["bomb", "big"])
def test_a_body_over_the_limit_is_502_and_flagged(
    servers: ThreadedServers, start_proxy: Callable[..., str], scenario: str
) -> None:
    upstream = servers.start(_upstream)
    proxy = start_proxy(upstream, meter={"kind": "estimate"}, server={"max_response_bytes": LIMIT})
    if scenario == "bomb":
        gzip_bomb()  # built before the peak is read
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with httpx.Client(timeout=30) as client:
        resp = client.post(f"{proxy}/v1/chat/completions", json=CHAT, headers={"X-Scenario": scenario})
        _assert_too_large(proxy, resp)
        # Nothing near the body's size was held (the peak of this whole test process: a bound only).
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kib < 64 * 1024
        assert client.get(f"{proxy}/scer/health").status_code == 200
        assert client.post(f"{proxy}/v1/chat/completions", json=CHAT).status_code == 200


def test_a_chunked_body_over_the_limit_is_502(
    raw_upstream: Callable[..., RawUpstream], start_proxy: Callable[..., str]
) -> None:
    upstream = raw_upstream(_chunked_big)
    proxy = start_proxy(upstream.url, meter={"kind": "estimate"}, server={"max_response_bytes": LIMIT})
    resp = httpx.post(f"{proxy}/v1/chat/completions", json=CHAT, timeout=30)
    _assert_too_large(proxy, resp)


def test_a_compressed_body_under_the_limit_passes_as_sent(
    servers: ThreadedServers, start_proxy: Callable[..., str]
) -> None:
    upstream = servers.start(_upstream)
    proxy = start_proxy(upstream, meter={"kind": "estimate"}, server={"max_response_bytes": LIMIT})
    with httpx.Client(timeout=30) as client:
        resp = client.post(f"{proxy}/v1/chat/completions", json=CHAT, headers={"X-Scenario": "gzip"})
    assert resp.status_code == 200
    assert resp.headers["content-encoding"] == "gzip"
    assert resp.content == CHAT_BODY  # httpx decompressed the bytes the upstream sent
    assert resp.headers["x-scer-token-source"] == "upstream"  # the usage was read from the copy
    assert resp.headers["x-scer-completion-tokens"] == "6"


def test_decode_capped() -> None:
    body = orjson.dumps({"usage": {"prompt_tokens": 1}}) * 10
    assert decode_capped(gzip.compress(body), "gzip", len(body)) == body
    assert decode_capped(zlib.compress(body), "deflate", len(body)) == body
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert decode_capped(raw_deflate.compress(body) + raw_deflate.flush(), "Deflate", len(body)) == body
    assert decode_capped(body, "identity", len(body)) == body
    assert decode_capped(gzip.compress(body)[:-12], "gzip", len(body)) is None  # truncated
    assert decode_capped(b"junk", "gzip", 100) is None
    assert decode_capped(body, "br", 100) is None
    for encoding, data in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body)), ("", body)):
        with pytest.raises(ResponseTooLarge):
            decode_capped(data, encoding, len(body) - 1)


def test_max_response_bytes_is_validated() -> None:
    assert load_config().server.max_response_bytes == 64 * 1024 * 1024
    assert load_config(environ={"SCER_SERVER_MAX_RESPONSE_BYTES": "1024"}).server.max_response_bytes == 1024
    for bad in ("0", "-1", "lots"):
        with pytest.raises(ConfigError, match=r"server\.max_response_bytes"):
            load_config(environ={"SCER_SERVER_MAX_RESPONSE_BYTES": bad})
