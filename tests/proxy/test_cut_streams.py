"""An answer the upstream breaks off is broken off for the client too (issue 14).

A stream cut by a FIN mid-body, a reset or a stall past ``timeout_s`` used to end for the client with
a clean chunked terminator, so that an SDK took the cut answer for a complete one. The proxy now
closes the connection without it, as nginx and Envoy do, and the record keeps
``upstream_broke_stream``. The upstream is a raw socket (an HTTP server library would not cut its own
body), and so is the client, which sees whether the last chunk came.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest

from scer_proxy.config import UpstreamConfig
from tests.conftest import proxy_config
from tests.proxy.raw_http import RawResponse, RawUpstream, Seen, chunk, exchange, request_bytes, reset

MODEL = "cut-model"
STREAM = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True})
PLAIN = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
WORDS = ["Rivers", " run", " to"]
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    b"Connection: close\r\n\r\n"
)


def _events() -> list[bytes]:
    out = []
    for word in WORDS:
        event = {
            "id": "c",
            "object": "chat.completion.chunk",
            "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
        }
        out.append(b"data: " + orjson.dumps(event) + b"\n\n")
    return out


def _end(conn: socket.socket, how: str, stop: threading.Event) -> None:
    if how == "fin":
        conn.shutdown(socket.SHUT_WR)
    elif how == "rst":
        time.sleep(0.05)  # let the proxy read what was sent before the reset discards it
        reset(conn)
    elif how == "stall":
        stop.wait(30)  # past the proxy's timeout_s; released when the test ends


def _stream_then(how: str) -> Callable[[socket.socket, Seen, threading.Event], None]:
    def script(conn: socket.socket, seen: Seen, stop: threading.Event) -> None:
        conn.sendall(SSE_HEAD)
        for event in _events():
            conn.sendall(chunk(event))
            time.sleep(0.01)
        _end(conn, how, stop)

    return script


def _body_then(how: str, *, chunked: bool) -> Callable[[socket.socket, Seen, threading.Event], None]:
    """A JSON answer of 1,000 bytes of which only the first 100 are sent."""

    def script(conn: socket.socket, seen: Seen, stop: threading.Event) -> None:
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: 1000"
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + framing + b"\r\n\r\n")
        part = b'{"object": "chat.completion", "choices": [' + b" " * 58
        conn.sendall(chunk(part) if chunked else part)
        time.sleep(0.01)
        _end(conn, how, stop)

    return script


def _proxy(start_proxy: Callable[..., str], upstream: RawUpstream, timeout_s: float = 600.0) -> str:
    config = dataclasses.replace(
        proxy_config(upstream.url, meter={"kind": "estimate"}),
        upstreams=(UpstreamConfig(name="up", url=upstream.url, timeout_s=timeout_s),),
    )
    return start_proxy(config=config)


def _record(proxy: str, rid: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while (resp := httpx.get(f"{proxy}/scer/requests/{rid}")).status_code != 200:
        assert time.monotonic() < deadline, "no record"
        time.sleep(0.02)
    record: dict[str, Any] = resp.json()
    return record


def _assert_cut(resp: RawResponse) -> None:
    assert resp.status == 200
    assert resp.closed, "the proxy kept the connection open"
    assert not resp.complete, "the client was sent a complete answer"
    assert not resp.raw.endswith(b"0\r\n\r\n")


@pytest.mark.parametrize("how", ["fin", "rst", "stall"])
def test_a_stream_the_upstream_cuts_is_cut_for_the_client(
    raw_upstream: Callable[..., RawUpstream], start_proxy: Callable[..., str], how: str
) -> None:
    upstream = raw_upstream(_stream_then(how))
    proxy = _proxy(start_proxy, upstream, timeout_s=0.5)
    started = time.monotonic()
    resp = exchange(proxy, request_bytes("POST", "/v1/chat/completions", STREAM))
    assert time.monotonic() - started < 15  # the stall ends at timeout_s, not when the upstream wakes
    _assert_cut(resp)
    for word in WORDS:
        assert orjson.dumps(word) in resp.body  # what the upstream sent was relayed before the cut
    record = _record(proxy, resp.headers["x-scer-request-id"])
    assert record["status"] == "upstream_error"
    assert "upstream_broke_stream" in record["flags"]
    assert record["completion_tokens"] > 0
    # The proxy goes on serving.
    assert httpx.get(f"{proxy}/scer/health").status_code == 200


def test_an_sdk_sees_the_cut_stream_as_an_error(
    raw_upstream: Callable[..., RawUpstream], start_proxy: Callable[..., str]
) -> None:
    upstream = raw_upstream(_stream_then("fin"))
    proxy = _proxy(start_proxy, upstream)
    with httpx.stream("POST", f"{proxy}/v1/chat/completions", content=STREAM, timeout=10) as resp:
        assert resp.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            for _ in resp.iter_raw():
                pass


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("how", ["fin", "rst", "stall"])
def test_a_non_streamed_body_cut_short_is_502_with_its_record(
    raw_upstream: Callable[..., RawUpstream], start_proxy: Callable[..., str], how: str, chunked: bool
) -> None:
    upstream = raw_upstream(_body_then(how, chunked=chunked))
    proxy = _proxy(start_proxy, upstream, timeout_s=0.5)
    resp = exchange(proxy, request_bytes("POST", "/v1/chat/completions", PLAIN))
    status, code = (504, "upstream_timeout") if how == "stall" else (502, "upstream_unavailable")
    assert resp.status == status and resp.complete
    assert orjson.loads(resp.body)["error"]["code"] == code
    record = _record(proxy, resp.headers["x-scer-request-id"])
    assert record["status"] == "error" and code in record["flags"]


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("how", ["fin", "rst", "stall"])
def test_a_passed_through_body_cut_short_is_cut_for_the_client(
    raw_upstream: Callable[..., RawUpstream], start_proxy: Callable[..., str], how: str, chunked: bool
) -> None:
    upstream = raw_upstream(_body_then(how, chunked=chunked))
    proxy = _proxy(start_proxy, upstream, timeout_s=0.5)
    resp = exchange(proxy, request_bytes("GET", "/v1/models"))
    _assert_cut(resp)
    assert httpx.get(f"{proxy}/scer/health").status_code == 200
