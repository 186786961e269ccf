"""The proxy changes nothing a client of the upstream would see, except the documented additions."""

from __future__ import annotations

import gzip
import socket
from collections.abc import Callable

import httpx
import orjson
import pytest

from tests.fake_upstream import CHAT_BODY, MODEL, RECEIVED

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "rivers?"}]}


def _raw_get(url: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    """POST with a raw socket and return the whole response (status line, headers, body) as bytes."""
    host, port = url.removeprefix("http://").split(":")
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def _scer_free(headers: httpx.Headers) -> dict[str, str]:
    skip = {"date", "server", "content-length", "transfer-encoding", "connection", "keep-alive"}
    return {k: v for k, v in headers.items() if not k.startswith("x-scer-") and k not in skip}


@pytest.mark.parametrize("scenario", ["", "gzip"])
def test_non_streamed_body_and_headers_equal_direct(
    fake_upstream: str, start_proxy: Callable[..., str], scenario: str
) -> None:
    proxy = start_proxy(fake_upstream, meter={"kind": "auto"})
    headers = {"X-Fake-Scenario": scenario, "Accept-Encoding": "gzip"}
    with httpx.Client() as client:
        direct = client.post(f"{fake_upstream}/v1/chat/completions", json=CHAT, headers=headers)
        via = client.post(f"{proxy}/v1/chat/completions", json=CHAT, headers=headers)
    assert via.status_code == direct.status_code == 200
    # httpx decodes gzip for .content; compare the raw bytes on the wire too.
    assert via.content == direct.content == CHAT_BODY
    assert _scer_free(via.headers) == _scer_free(direct.headers)
    assert via.headers["x-scer-prompt-tokens"] == "17"
    assert via.headers["x-scer-completion-tokens"] == "6"
    assert via.headers["x-scer-token-source"] == "upstream"
    if scenario == "gzip":
        assert via.headers["content-encoding"] == "gzip"
        raw = _raw_get(proxy, "/v1/chat/completions", orjson.dumps(CHAT), headers)
        assert (
            gzip.compress(CHAT_BODY)[10:] in raw
        )  # the compressed payload passes untouched (gzip header aside)


@pytest.mark.parametrize("scenario", ["", "crlf", "split"])
@pytest.mark.parametrize("asked", [True, False])
def test_stream_bytes_equal_direct_except_additions(
    fake_upstream: str, start_proxy: Callable[..., str], scenario: str, asked: bool
) -> None:
    proxy = start_proxy(fake_upstream, meter={"kind": "auto"})
    body = {**CHAT, "stream": True, **({"stream_options": {"include_usage": True}} if asked else {})}
    headers = {"X-Fake-Scenario": scenario}
    with httpx.Client() as client:
        direct = client.post(f"{fake_upstream}/v1/chat/completions", json=body, headers=headers).content
        via = client.post(f"{proxy}/v1/chat/completions", json=body, headers=headers).content
    sep = b"\r\n\r\n" if scenario == "crlf" else b"\n\n"
    direct_events = [e for e in direct.split(sep) if e]
    via_events = [e for e in via.split(sep) if e]
    comments = [e for e in via_events if e.startswith(b": scer ")]
    if asked:
        # Identical except the usage chunk, which gains usage.scer.
        assert not comments
        assert len(via_events) == len(direct_events)
        for d, v in zip(direct_events, via_events, strict=True):
            if b'"usage":{' in d:
                dv, vv = orjson.loads(d[6:]), orjson.loads(v[6:])
                scer = vv["usage"].pop("scer")
                assert vv == dv
                assert scer["prompt_tokens"] == 17 and scer["completion_tokens"] == 6
            else:
                assert v == d
    else:
        # Identical to what the client would get without usage, plus one comment before [DONE].
        assert len(comments) == 1
        without = [e for e in via_events if not e.startswith(b": scer ")]
        assert without == direct_events
        assert via_events.index(comments[0]) == len(via_events) - 2
        assert via_events[-1] == b"data: [DONE]"
        figures = orjson.loads(comments[0][len(b": scer ") :])
        assert figures["completion_tokens"] == 6 and figures["token_source"] == "upstream"


def test_usage_in_finish_chunk_is_removed_for_clients_that_did_not_ask(
    fake_upstream: str, start_proxy: Callable[..., str]
) -> None:
    proxy = start_proxy(fake_upstream, meter={"kind": "auto"})
    body = {"model": MODEL, "prompt": "x", "stream": True}
    with httpx.Client() as client:
        via = client.post(
            f"{proxy}/v1/completions", json=body, headers={"X-Fake-Scenario": "llamacpp-completions"}
        )
    data = [orjson.loads(line[6:]) for line in via.text.splitlines() if line.startswith("data: {")]
    assert data and all("usage" not in c for c in data)
    assert data[-1]["choices"][0]["finish_reason"] == "length"
    comment = [line for line in via.text.splitlines() if line.startswith(": scer ")]
    assert orjson.loads(comment[0][7:])["completion_tokens"] == 3


def test_request_forwarded_unchanged_except_hop_by_hop(
    fake_upstream: str, start_proxy: Callable[..., str], servers
) -> None:  # type: ignore[no-untyped-def]
    proxy = start_proxy(fake_upstream, meter={"kind": "auto"})
    payload = bytes(range(256)) * 1000
    with httpx.Client() as client:
        resp = client.put(
            f"{proxy}/v1/echo/a/b?x=1&y=%20z",
            content=payload,
            headers={
                "Authorization": "Bearer sk-secret",
                "X-Custom": "v",
                "Connection": "keep-alive, X-Drop-Me",
                "X-Drop-Me": "1",
                "Proxy-Authorization": "Basic abc",
            },
        )
    assert resp.status_code == 201
    assert resp.content == payload
    assert resp.headers["x-echo-method"] == "PUT"
    received = servers.loop.call_soon_threadsafe  # keep the loop alive while reading received data
    assert received
    app_received = [r for r in _received(servers) if r["path"].startswith("/v1/echo")]
    got = app_received[-1]
    assert got["path"] == "/v1/echo/a/b?x=1&y=%20z"
    assert got["body"] == payload
    assert got["headers"]["Authorization"] == "Bearer sk-secret"
    assert got["headers"]["X-Custom"] == "v"
    assert "X-Drop-Me" not in got["headers"]
    assert "Proxy-Authorization" not in got["headers"]


def _received(servers) -> list[dict]:  # type: ignore[no-untyped-def]
    runner = servers._runners[0]
    return runner.app[RECEIVED]


def test_stream_request_asks_upstream_for_usage(
    fake_upstream: str, start_proxy: Callable[..., str], servers
) -> None:  # type: ignore[no-untyped-def]
    proxy = start_proxy(fake_upstream, meter={"kind": "auto"})
    body = {**CHAT, "stream": True, "stream_options": {"something": 1}}
    with httpx.Client() as client:
        client.post(f"{proxy}/v1/chat/completions", json=body)
        client.post(f"{proxy}/v1/chat/completions", json=CHAT)
    streamed, plain = _received(servers)[-2:]
    assert orjson.loads(streamed["body"])["stream_options"] == {"something": 1, "include_usage": True}
    assert plain["body"] == orjson.dumps(CHAT)  # a non-streamed body passes byte for byte


def test_keep_alive_both_ways(fake_upstream: str, start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(fake_upstream, meter={"kind": "auto"})
    ports = set()
    with httpx.Client() as client:
        for _ in range(5):
            resp = client.post(f"{proxy}/v1/chat/completions", json=CHAT, extensions={})
            assert resp.status_code == 200
            stream = resp.extensions["network_stream"]
            ports.add(stream.get_extra_info("client_addr"))
    assert len(ports) == 1  # one client connection reused for all five requests


def test_stream_events_reach_the_client_before_the_upstream_finishes(
    fake_upstream: str, start_proxy: Callable[..., str]
) -> None:
    proxy = start_proxy(fake_upstream, meter={"kind": "auto"})
    body = {**CHAT, "stream": True}
    with (
        httpx.Client(timeout=10) as client,
        client.stream(
            "POST", f"{proxy}/v1/chat/completions", json=body, headers={"X-Fake-Scenario": "hold"}
        ) as resp,
    ):
        lines = resp.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        # The upstream is still holding the rest of its stream: the first event was not buffered.
        assert orjson.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        assert client.post(f"{fake_upstream}/release").status_code == 200
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
