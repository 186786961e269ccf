"""Streams cut short are counted like streams without usage: the upstream's ``/tokenize`` first, then cl100k.

The fake's ``/tokenize`` is llama.cpp's: it counts ``content`` and has no chat form, so the prompt of a
cut chat stream is counted with cl100k here (the chat form: ``test_cut_stream_prompt_tokens.py``).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from scer_proxy.wire.tokens import count_prompt, count_text
from tests.servers import ThreadedServers

MODEL = "partial-model"
# cl100k counts these in 8 tokens; the fake /tokenize counts characters (45), so the two counts differ.
WORDS = [" Rivers", " run", " slowly", " toward", " the", " distant", " estuary"]
TEXT = "".join(WORDS)
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "tell me about rivers"}], "stream": True}
TOKENIZED = web.AppKey("tokenized", list)  # the texts /tokenize was asked to count (None: a 404 answer)
CHAT_FORM = "<messages>"  # in TOKENIZED: /tokenize was asked for a chat prompt in vLLM's form


def partial_upstream(*, tokenize: str, then: str) -> web.Application:
    """Streams WORDS slowly and never sends usage; ``then``: ``hang`` (until the proxy goes away), ``break``
    (drops the connection mid-body) or ``end`` (a clean end without ``[DONE]``). ``tokenize``: ``chars``
    (``/tokenize`` counts characters), ``404`` (no such endpoint) or ``slow`` (answers after 7 s)."""

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for word in WORDS:
            chunk: dict[str, Any] = {
                "id": "chatcmpl-p",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": MODEL,
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
            }
            await out.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            await asyncio.sleep(0.02)
        if then == "hang":
            await asyncio.sleep(60)  # cancelled when the proxy drops the connection
        elif then == "break":
            assert request.transport is not None
            request.transport.abort()
            return out
        await out.write_eof()
        return out

    async def count(request: web.Request) -> web.Response:
        parsed = orjson.loads(await request.read())
        if tokenize == "404":
            request.app[TOKENIZED].append(None)
            return web.Response(status=404, text="Not Found")
        if tokenize == "slow":
            await asyncio.sleep(7)  # past the proxy's 5 s limit on /tokenize
        if "content" not in parsed:
            # llama.cpp's answer to a body without ``content`` (vLLM's chat form): no tokens.
            request.app[TOKENIZED].append(CHAT_FORM)
            return web.json_response({"tokens": []})
        text = str(parsed.get("content", ""))
        assert parsed.get("prompt") == text and parsed.get("add_special_tokens") is False
        request.app[TOKENIZED].append(text)
        return web.json_response({"tokens": list(range(len(text)))})

    app = web.Application()
    app[TOKENIZED] = []
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/tokenize", count)
    return app


def _wait(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _record(proxy: str, rid: str, seconds: float = 10.0) -> dict[str, Any]:
    _wait(lambda: httpx.get(f"{proxy}/scer/requests/{rid}").status_code == 200, seconds)
    record: dict[str, Any] = httpx.get(f"{proxy}/scer/requests/{rid}").json()
    return record


def _read_then_disconnect(proxy: str) -> str:
    """Read every chunk the upstream sends, then go away mid-stream; returns the request id."""
    host, port = proxy.removeprefix("http://").split(":")
    payload = orjson.dumps(BODY)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        received = b""
        while received.count(b"data: {") < len(WORDS):
            data = sock.recv(65536)
            assert data, "the proxy closed the stream early"
            received += data
    head = received.partition(b"\r\n\r\n")[0]
    return next(
        line.split(b": ", 1)[1].decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"x-scer-request-id")
    )


def test_client_disconnect_counts_the_partial_completion_with_the_upstreams_tokenize(
    servers: ThreadedServers, start_proxy: Callable[..., str]
) -> None:
    upstream = servers.start(
        lambda: partial_upstream(tokenize="chars", then="hang"), handler_cancellation=True
    )
    proxy = start_proxy(upstream)
    rid = _read_then_disconnect(proxy)
    record = _record(proxy, rid)
    assert record["status"] == "cancelled"
    assert "client_disconnected" in record["flags"]
    assert len(TEXT) != count_text(TEXT)  # the two counts must differ for this test to mean anything
    assert record["completion_tokens"] == len(TEXT)  # the upstream's count, not cl100k's
    # llama.cpp cannot count a chat prompt (no chat form): cl100k, as for streams without usage.
    assert record["prompt_tokens"] == count_prompt("chat", BODY)
    assert record["token_source"] == "tokenizer"
    # Asked once for the completion text relayed so far, and once for the prompt in the chat form.
    assert sorted(servers._runners[0].app[TOKENIZED]) == sorted([TEXT, CHAT_FORM])


def test_partial_stream_falls_back_to_cl100k_without_tokenize(
    servers: ThreadedServers, start_proxy: Callable[..., str]
) -> None:
    upstream = servers.start(lambda: partial_upstream(tokenize="404", then="hang"), handler_cancellation=True)
    proxy = start_proxy(upstream)
    for _ in range(2):
        record = _record(proxy, _read_then_disconnect(proxy))
        assert record["status"] == "cancelled"
        assert "client_disconnected" in record["flags"]
        assert record["completion_tokens"] == count_text(TEXT)
        assert record["prompt_tokens"] == count_prompt("chat", BODY)
        assert record["token_source"] == "tokenizer"
    # The 404 is remembered: the second stream is not counted with another request (the first asked for
    # its completion and, at the same time, its prompt).
    assert servers._runners[0].app[TOKENIZED] == [None, None]


def test_broken_upstream_stream_is_counted_with_the_upstreams_tokenize(
    servers: ThreadedServers, start_proxy: Callable[..., str]
) -> None:
    upstream = servers.start(lambda: partial_upstream(tokenize="chars", then="break"))
    proxy = start_proxy(upstream)
    received = b""
    with httpx.stream("POST", f"{proxy}/v1/chat/completions", json=BODY, timeout=10) as resp:
        rid = resp.headers["x-scer-request-id"]
        # The proxy breaks the stream off as the upstream did (tests/proxy/test_cut_streams.py).
        with pytest.raises(httpx.RemoteProtocolError):
            for data in resp.iter_raw():
                received += data
    assert received.count(b"data: {") == len(WORDS)
    record = _record(proxy, rid)
    assert record["status"] == "upstream_error"
    assert "upstream_broke_stream" in record["flags"]
    assert record["completion_tokens"] == len(TEXT)
    assert record["prompt_tokens"] == count_prompt("chat", BODY)
    assert record["token_source"] == "tokenizer"
    assert sorted(servers._runners[0].app[TOKENIZED]) == sorted([TEXT, CHAT_FORM])


def test_stream_ending_without_done_or_usage_is_counted_with_the_upstreams_tokenize(
    servers: ThreadedServers, start_proxy: Callable[..., str]
) -> None:
    upstream = servers.start(lambda: partial_upstream(tokenize="chars", then="end"))
    proxy = start_proxy(upstream)
    resp = httpx.post(f"{proxy}/v1/chat/completions", json=BODY, timeout=10)
    comment = orjson.loads(next(x for x in resp.text.splitlines() if x.startswith(": scer "))[7:])
    assert comment["completion_tokens"] == len(TEXT) and comment["token_source"] == "tokenizer"
    record = _record(proxy, resp.headers["x-scer-request-id"])
    assert record["status"] == "ok"
    assert record["completion_tokens"] == len(TEXT)
    assert servers._runners[0].app[TOKENIZED] == [TEXT]


def test_partial_stream_record_is_written_when_tokenize_times_out(
    servers: ThreadedServers, start_proxy: Callable[..., str]
) -> None:
    # The count runs in the handler the client's disconnect cancelled; a /tokenize that does not answer
    # in 5 s must not hold the record back or lose it: cl100k counts it then.
    upstream = servers.start(
        lambda: partial_upstream(tokenize="slow", then="hang"), handler_cancellation=True
    )
    proxy = start_proxy(upstream)
    started = time.monotonic()
    rid = _read_then_disconnect(proxy)
    record = _record(proxy, rid, seconds=15.0)
    assert 4.5 < time.monotonic() - started < 12.0
    assert record["status"] == "cancelled"
    assert "client_disconnected" in record["flags"]
    assert record["completion_tokens"] == count_text(TEXT)
    assert record["token_source"] == "tokenizer"
