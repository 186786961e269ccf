"""A stream the client cuts short has its prompt counted by the upstream's ``/tokenize``, like its completion.

The completion relayed so far was already counted there; the prompt was counted with cl100k. Now the
prompt goes to ``/tokenize`` too, in vLLM's chat form for chat (``model`` and ``messages``: the model's
chat template applied, answered with ``count``) and as text for completions. A server with no chat
form (llama.cpp) is covered in ``test_partial_stream_tokens.py``: cl100k counts the prompt there.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import httpx
import orjson
from aiohttp import web

from scer_proxy.wire.tokens import count_prompt, count_text
from tests.servers import ThreadedServers

MODEL = "vllm-model"
WORDS = [" Rivers", " run", " slowly", " toward", " the", " distant", " estuary"]
TEXT = "".join(WORDS)
CHAT = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "tell me about rivers"},
    ],
    "stream": True,
}
COMPLETION = {"model": MODEL, "prompt": "Rivers of the world, longest first:", "stream": True}
TEMPLATE_TOKENS = 11  # what the fake's "chat template" adds to the characters of the messages
ASKED = web.AppKey("asked", list)  # the /tokenize bodies received


def chat_form_count(messages: list[dict[str, Any]]) -> int:
    """The fake's count of a chat prompt: one token a character of content, plus its template's."""
    return sum(len(m["content"]) for m in messages) + TEMPLATE_TOKENS


def vllm_like_upstream() -> web.Application:
    """Streams WORDS without usage and then waits (until the proxy goes away); ``/tokenize`` counts one
    token a character, in vLLM's two forms: ``messages`` (plus a template) or ``prompt``."""

    async def stream(request: web.Request) -> web.StreamResponse:
        chat = request.path.endswith("/chat/completions")
        await request.read()
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        for word in WORDS:
            choice = {"index": 0, "delta": {"content": word}} if chat else {"index": 0, "text": word}
            chunk = {"id": "x", "created": 1700000000, "model": MODEL, "choices": [choice]}
            await out.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            await asyncio.sleep(0.02)
        await asyncio.sleep(60)  # cancelled when the proxy drops the connection
        return out

    async def tokenize(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        request.app[ASKED].append(body)
        if "messages" in body:
            assert body["model"] == MODEL and body["add_generation_prompt"] is True
            count = chat_form_count(body["messages"])
        else:
            count = len(body["prompt"])
        return web.json_response({"count": count, "max_model_len": 4096, "tokens": list(range(count))})

    app = web.Application()
    app[ASKED] = []
    app.router.add_post("/v1/chat/completions", stream)
    app.router.add_post("/v1/completions", stream)
    app.router.add_post("/tokenize", tokenize)
    return app


def _read_then_disconnect(proxy: str, path: str, body: dict[str, Any]) -> str:
    """Read every chunk the upstream sends, then go away mid-stream; returns the request id."""
    host, port = proxy.removeprefix("http://").split(":")
    payload = orjson.dumps(body)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
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


def _record(proxy: str, rid: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while (resp := httpx.get(f"{proxy}/scer/requests/{rid}")).status_code != 200:
        assert time.monotonic() < deadline, "the record never reached the ledger"
        time.sleep(0.02)
    record: dict[str, Any] = resp.json()
    return record


def test_cut_chat_stream_counts_its_prompt_with_the_upstreams_chat_tokenize(
    servers: ThreadedServers, start_proxy: Any
) -> None:
    upstream = servers.start(vllm_like_upstream, handler_cancellation=True)
    proxy = start_proxy(upstream)
    record = _record(proxy, _read_then_disconnect(proxy, "/v1/chat/completions", CHAT))
    assert record["status"] == "cancelled" and "client_disconnected" in record["flags"]
    expected = chat_form_count(CHAT["messages"])
    assert expected != count_prompt("chat", CHAT)  # the two counts differ, so the test means something
    assert record["prompt_tokens"] == expected  # the upstream's count, not cl100k's
    assert record["completion_tokens"] == len(TEXT) != count_text(TEXT)
    assert record["token_source"] == "tokenizer"
    asked = servers._runners[0].app[ASKED]
    # The prompt in the chat form (the request's model and messages), the completion as text.
    assert sorted(asked, key=lambda b: "messages" in b) == [
        {"prompt": TEXT, "content": TEXT, "add_special_tokens": False},
        {"model": MODEL, "messages": CHAT["messages"], "add_generation_prompt": True},
    ]


def test_cut_completions_stream_counts_its_prompt_with_the_upstreams_tokenize(
    servers: ThreadedServers, start_proxy: Any
) -> None:
    upstream = servers.start(vllm_like_upstream, handler_cancellation=True)
    proxy = start_proxy(upstream)
    record = _record(proxy, _read_then_disconnect(proxy, "/v1/completions", COMPLETION))
    assert record["status"] == "cancelled"
    prompt = str(COMPLETION["prompt"])
    assert len(prompt) != count_prompt("completions", COMPLETION)
    assert record["prompt_tokens"] == len(prompt)
    assert record["completion_tokens"] == len(TEXT)
    prompt_asks = [b for b in servers._runners[0].app[ASKED] if b.get("model") == MODEL]
    assert prompt_asks == [{"model": MODEL, "prompt": prompt, "content": prompt, "add_special": True}]
