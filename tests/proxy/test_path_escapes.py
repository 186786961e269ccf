"""A ``/v1/`` path that resolves outside ``/v1`` is answered 404 and never forwarded (issue 14).

The router matches ``/v1/{tail}`` on the path as sent; the upstream client used to resolve the dot
segments afterwards, so ``/v1/../metrics`` reached the upstream's ``/metrics``. The requests are sent
on raw sockets, since an HTTP client would resolve the dots itself; the upstream records every path.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import orjson
import pytest

from scer_proxy.proxy.handler import normalize_path
from tests.proxy.raw_http import RawUpstream, Seen, exchange, request_bytes

CHAT = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
ANSWER = orjson.dumps(
    {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
)


def _answer(conn: socket.socket, seen: Seen, stop: threading.Event) -> None:
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + f"Content-Length: {len(ANSWER)}\r\n\r\n".encode()
        + ANSWER
    )


ESCAPES = [
    ("POST", "/v1/../sim/faults", b"{}"),
    ("GET", "/v1/../metrics", None),
    ("GET", "/v1/../slots", None),
    ("GET", "/v1/%2e%2e/metrics", None),
    ("GET", "/v1/%2E%2E/props", None),
    ("GET", "/v1/.%2e/metrics", None),
    ("GET", "/v1/..%2fmetrics", None),
    ("GET", "/v1/..%2Fmetrics", None),
    ("GET", "/v1/%2e%2e%2fmetrics", None),
    ("GET", "/v1/..\\metrics", None),
    ("GET", "/v1/..%5cmetrics", None),
    ("GET", "/v1/models/../../metrics", None),
    ("GET", "/v1/..", None),
    ("GET", "/v1/../v1x/models", None),
    ("GET", "/v1/../metrics?x=1", None),
    ("GET", "http://elsewhere/v1/../metrics", None),  # the absolute form
    ("POST", "/v1/chat/completions/../../../sim/faults", CHAT),  # a metered body changes nothing
]


@pytest.mark.parametrize(("method", "target", "body"), ESCAPES)
def test_a_path_that_leaves_v1_is_404_and_never_forwarded(
    raw_upstream: Callable[..., RawUpstream],
    start_proxy: Callable[..., str],
    method: str,
    target: str,
    body: bytes | None,
) -> None:
    upstream = raw_upstream(_answer)
    proxy = start_proxy(upstream.url, meter={"kind": "estimate"})
    resp = exchange(proxy, request_bytes(method, target, body))
    assert resp.status == 404
    assert resp.headers["content-type"].startswith("application/json")
    error = orjson.loads(resp.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "path_not_found"
    assert upstream.seen == []
    # And the proxy goes on serving.
    ok = exchange(proxy, request_bytes("POST", "/v1/chat/completions", CHAT))
    assert ok.status == 200 and [s.target for s in upstream.seen] == ["/v1/chat/completions"]


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        ("/v1/models/../models", "/v1/models"),
        ("/v1/./models", "/v1/models"),
        ("/v1/a%3Fb?x=%20y&z", "/v1/a%3Fb?x=%20y&z"),  # an escaped "?" stays in the path, the query raw
        ("/v1/%252e%252e/metrics", "/v1/%252e%252e/metrics"),  # decoded once: a name, not a dot segment
        ("/v1/%5c..%5cmetrics", "/v1/metrics"),  # "/v1//../metrics", as a server reading "\\" as "/" would
        ("/v1", "/v1"),
    ],
)
def test_a_path_inside_v1_is_forwarded_as_resolved(
    raw_upstream: Callable[..., RawUpstream],
    start_proxy: Callable[..., str],
    target: str,
    forwarded: str,
) -> None:
    upstream = raw_upstream(_answer)
    proxy = start_proxy(upstream.url, meter={"kind": "estimate"})
    assert exchange(proxy, request_bytes("GET", target)).status == 200
    assert [s.target for s in upstream.seen] == [forwarded]


def test_a_metered_path_is_metered_once_resolved(
    raw_upstream: Callable[..., RawUpstream], start_proxy: Callable[..., str]
) -> None:
    upstream = raw_upstream(_answer)
    proxy = start_proxy(upstream.url, meter={"kind": "estimate"})
    resp = exchange(proxy, request_bytes("POST", "/v1/models/../chat/./completions", CHAT))
    assert resp.status == 200
    assert resp.headers["x-scer-request-id"].startswith("scer-")
    assert [s.target for s in upstream.seen] == ["/v1/chat/completions"]


@pytest.mark.parametrize(
    ("raw", "resolved"),
    [
        ("/v1/chat/completions", "/v1/chat/completions"),
        ("/v1/../metrics", "/metrics"),
        ("/v1/a/b/../../..", "/"),
        ("/v1/a/..", "/v1/"),
        ("/v1/a/.", "/v1/a/"),
        ("/v1/%2e%2e/%2E%2e", "/"),
        ("/v1/x%2f..%2f..%2fy", "/y"),
        ("/v1\\..\\y", "/y"),
        ("/v1//../y", "/v1/y"),
        ("/../../v1/models", "/v1/models"),
    ],
)
def test_normalize_path(raw: str, resolved: str) -> None:
    assert normalize_path(raw) == resolved
