"""A fake OpenAI-compatible upstream: a real aiohttp app on port 0 with fixed, byte-exact answers.

Used where a test needs exact bytes (fidelity), odd framing (CRLF events, split reads, usage in the
finish chunk), compressed bodies, slow answers or broken connections. What it received is kept in
``app[RECEIVED]`` so tests can check what the proxy forwarded.
"""

from __future__ import annotations

import asyncio
import gzip
from typing import Any

import orjson
from aiohttp import web

RECEIVED = web.AppKey("received", list)
RELEASE = web.AppKey("release", asyncio.Event)
MODEL = "fake-model"

CHAT_BODY = orjson.dumps(
    {
        "id": "chatcmpl-fixed",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Rivers run to the sea."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 17, "completion_tokens": 6, "total_tokens": 23},
    }
)


def chat_stream_events(include_usage: bool, *, usage_null: bool = True, crlf: bool = False) -> list[bytes]:
    """An OpenAI-style chat stream; ``usage: null`` on every chunk when usage was requested."""
    sep = b"\r\n\r\n" if crlf else b"\n\n"
    words = ["Rivers", " run", " to", " the", " sea", "."]
    base: dict[str, Any] = {
        "id": "chatcmpl-s",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
    }
    chunks: list[dict[str, Any]] = [
        {
            **base,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
        }
    ]
    chunks += [
        {**base, "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]} for w in words
    ]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    if include_usage and usage_null:
        chunks = [{**c, "usage": None} for c in chunks]
    if include_usage:
        chunks.append(
            {
                **base,
                "choices": [],
                "usage": {"prompt_tokens": 17, "completion_tokens": 6, "total_tokens": 23},
            }
        )
    return [b"data: " + orjson.dumps(c) + sep for c in chunks] + [b"data: [DONE]" + sep]


def completion_stream_usage_in_finish(include_usage: bool) -> list[bytes]:
    """llama.cpp's /v1/completions variant: usage rides on the finish_reason chunk, asked or not."""
    base: dict[str, Any] = {
        "id": "cmpl-l",
        "object": "text_completion",
        "created": 1700000000,
        "model": MODEL,
    }
    out = [{**base, "choices": [{"index": 0, "text": w, "finish_reason": None}]} for w in ["A", " b", " c"]]
    out.append(
        {
            **base,
            "choices": [{"index": 0, "text": "", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        }
    )
    return [b"data: " + orjson.dumps(c) + b"\n\n" for c in out] + [b"data: [DONE]\n\n"]


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    request.app[RECEIVED].append({"path": request.path_qs, "headers": dict(request.headers), "body": body})
    scenario = request.headers.get("X-Fake-Scenario", "")
    if scenario == "slow":
        await asyncio.sleep(float(request.headers.get("X-Fake-Delay", "5")))
    if scenario == "drop":
        assert request.transport is not None
        request.transport.close()
        await asyncio.sleep(0.1)
        return web.Response()
    if scenario == "upstream-400":
        return web.json_response(
            {
                "error": {
                    "message": "context too long",
                    "type": "exceed_context_size_error",
                    "param": None,
                    "code": 400,
                }
            },
            status=400,
        )
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return web.json_response(
            {"error": {"message": "bad json", "type": "invalid_request_error", "param": None, "code": None}},
            status=400,
        )
    if not parsed.get("stream"):
        headers = {"X-Upstream-Header": "kept", "Set-Cookie": "a=b"}
        if scenario == "gzip":
            return web.Response(
                body=gzip.compress(CHAT_BODY),
                headers={**headers, "Content-Encoding": "gzip"},
                content_type="application/json",
            )
        if scenario == "no-usage":
            answer = orjson.loads(CHAT_BODY)
            del answer["usage"]
            return web.Response(body=orjson.dumps(answer), headers=headers, content_type="application/json")
        return web.Response(body=CHAT_BODY, headers=headers, content_type="application/json")
    include = bool((parsed.get("stream_options") or {}).get("include_usage"))
    if scenario == "llamacpp-completions":
        events = completion_stream_usage_in_finish(include)
    else:
        events = chat_stream_events(include, crlf=scenario == "crlf", usage_null=scenario != "no-null")
        if scenario == "no-stream-usage":
            events = chat_stream_events(False)
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Upstream-Header": "kept"})
    await out.prepare(request)
    raw = b"".join(events)
    if scenario == "split":
        # Deliver the stream in awkward pieces: events split across reads, several events in one read.
        for i in range(0, len(raw), 7):
            await out.write(raw[i : i + 7])
            await asyncio.sleep(0)
    elif scenario == "hold":
        # Send the first two events, then wait until the test releases the rest (POST /release).
        for event in events[:2]:
            await out.write(event)
        await request.app[RELEASE].wait()
        for event in events[2:]:
            await out.write(event)
    else:
        gap = float(request.headers.get("X-Fake-Gap", "0"))
        for event in events:
            await out.write(event)
            if gap:
                await asyncio.sleep(gap)
    await out.write_eof()
    return out


async def embeddings(request: web.Request) -> web.Response:
    parsed = orjson.loads(await request.read())
    inputs = parsed["input"] if isinstance(parsed["input"], list) else [parsed["input"]]
    return web.json_response(
        {
            "object": "list",
            "model": MODEL,
            "data": [
                {"object": "embedding", "index": i, "embedding": [0.1, 0.2, 0.3]} for i in range(len(inputs))
            ],
            "usage": {"prompt_tokens": 40, "total_tokens": 40},
        }
    )


RESPONSE_USAGE = {"input_tokens": 11, "output_tokens": 4, "total_tokens": 15}


def responses_events() -> list[bytes]:
    """A Responses API stream: typed events, usage in ``response.completed``."""
    done = {
        "type": "response.completed",
        "response": {"id": "resp_1", "object": "response", "status": "completed", "usage": RESPONSE_USAGE},
    }
    events = [{"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}}]
    events += [{"type": "response.output_text.delta", "delta": w} for w in ["Hi", " there", " you", "."]]
    events.append(done)
    return [b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events]


async def responses(request: web.Request) -> web.StreamResponse:
    parsed = orjson.loads(await request.read())
    if not parsed.get("stream"):
        return web.json_response(
            {
                "id": "resp_1",
                "object": "response",
                "status": "completed",
                "model": MODEL,
                "output": [
                    {
                        "type": "message",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": "Hi there you."}],
                    }
                ],
                "usage": RESPONSE_USAGE,
            }
        )
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await out.prepare(request)
    for event in responses_events():
        await out.write(event)
    await out.write_eof()
    return out


async def tokenize(request: web.Request) -> web.Response:
    """llama.cpp's /tokenize: {"content"} -> {"tokens"}; one token per whitespace-separated word here."""
    parsed = orjson.loads(await request.read())
    request.app[RECEIVED].append({"path": request.path_qs, "headers": dict(request.headers), "body": b""})
    return web.json_response({"tokens": list(range(len(str(parsed.get("content", "")).split())))})


async def models(request: web.Request) -> web.Response:
    return web.json_response(
        {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "fake"}]},
        headers={"X-Upstream-Header": "kept"},
    )


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    request.app[RECEIVED].append({"path": request.path_qs, "headers": dict(request.headers), "body": body})
    return web.Response(
        body=body,
        status=201,
        headers={"X-Echo-Method": request.method, "Content-Type": "application/octet-stream"},
    )


async def release(request: web.Request) -> web.Response:
    request.app[RELEASE].set()
    return web.Response(text="released")


def create_fake_upstream() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[RECEIVED] = []
    app[RELEASE] = asyncio.Event()
    app.router.add_post("/release", release)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_route("*", "/v1/echo/{tail:.*}", echo)
    return app
