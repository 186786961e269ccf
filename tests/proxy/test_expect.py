"""``Expect: 100-continue`` is not forwarded: the proxy holds the body already (issue 14).

Forwarded, it made the proxy's client wait for a ``100 Continue`` that an upstream may never send: the
request hung 200 s past ``timeout_s``. The upstream here is a raw socket that never sends one, and
the client sends the head, waits for the proxy's own ``100 Continue``, then the body.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import orjson
import pytest

from tests.proxy.raw_http import RawUpstream, Seen, parse_response

BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
ANSWER = orjson.dumps(
    {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
)


def _never_continues(conn: socket.socket, seen: Seen, stop: threading.Event) -> None:
    """Answers a request that came whole; one that waits for 100 Continue waits for good."""
    if seen.body is None:
        stop.wait(60)
        return
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + f"Content-Length: {len(ANSWER)}\r\n\r\n".encode()
        + ANSWER
    )


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/echo"])
def test_expect_is_not_forwarded(
    raw_upstream: Callable[..., RawUpstream], start_proxy: Callable[..., str], path: str
) -> None:
    upstream = raw_upstream(_never_continues)
    proxy = start_proxy(upstream.url, meter={"kind": "estimate"})
    host, port = proxy.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n"
            "Expect: 100-continue\r\n\r\n".encode()
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")  # the proxy's own
        sock.sendall(BODY)
        raw = b""
        while data := sock.recv(65536):  # times out (fails) if the proxy waits on the upstream
            raw += data
    resp = parse_response(raw, closed=True)
    assert resp.status == 200 and resp.complete
    assert [s.body for s in upstream.seen] == [BODY]
    assert "expect" not in upstream.seen[0].headers
