"""A trivial, fast OpenAI-compatible upstream for measuring the proxy's own overhead.

Run as its own process: ``python bench/fast_upstream.py PORT``. It does as little as it can per
request, so that the time and CPU measured around it belong to whatever sits between it and the
client (the proxy, or nothing).

- ``POST /v1/chat/completions``: a ~200-byte chat completion with ``usage``. With ``"stream": true``
  an SSE stream of N content chunks (N = ``max_tokens``, default 16), a finish chunk, then, when
  ``stream_options.include_usage`` is true, ``"usage": null`` in every chunk and a final
  ``"choices": []`` usage chunk, then ``data: [DONE]``. A delay between chunks comes from the
  ``X-Fast-Chunk-Delay-Ms`` header or the body's ``chunk_delay_ms`` field (milliseconds, default 0).
- ``GET /metrics``: a DCGM-style energy counter (mJ) that grows at 300 W of wall time, so the
  proxy's ``--meter simulated`` path scrapes and attributes energy during a benchmark.
- ``GET /health``: 200.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

import orjson
import uvloop
from aiohttp import web

from scer_proxy.proxy.serving import wait_for_signal

POWER_W = 300.0
MODEL = "fast-model"
CREATED = 1_700_000_000
TOKEN = " tok"
_START = time.monotonic()

_COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-fast",
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hello there."}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16},
    }
)


def _chunk(delta: dict[str, str], finish: str | None, with_usage: bool) -> bytes:
    body: dict[str, object] = {
        "id": "chatcmpl-fast",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if with_usage:
        body["usage"] = None
    return b"data: " + orjson.dumps(body) + b"\n\n"


# Prebuilt events: (first, middle, finish), without and with "usage": null.
_EVENTS = {
    flag: (
        _chunk({"role": "assistant", "content": TOKEN}, None, flag),
        _chunk({"content": TOKEN}, None, flag),
        _chunk({}, "length", flag),
    )
    for flag in (False, True)
}
_DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def _usage_event(n: int) -> bytes:
    return (
        b"data: "
        + orjson.dumps(
            {
                "id": "chatcmpl-fast",
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": MODEL,
                "choices": [],
                "usage": {"prompt_tokens": 12, "completion_tokens": n, "total_tokens": 12 + n},
            }
        )
        + b"\n\n"
    )


def events_per_stream(chunks: int, include_usage: bool) -> int:
    """SSE events the upstream sends for one stream: content chunks, finish, [usage], [DONE]."""
    return chunks + 2 + (1 if include_usage else 0)


def _delay_ms(request: web.Request, body: dict[str, object]) -> float:
    header = request.headers.get("X-Fast-Chunk-Delay-Ms")
    if header:
        return float(header)
    value = body.get("chunk_delay_ms", 0)
    return float(value) if isinstance(value, int | float) else 0.0


async def chat(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    if not body.get("stream"):
        return web.Response(body=_COMPLETION, content_type="application/json")
    max_tokens = body.get("max_tokens")
    n = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 16
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    delay = _delay_ms(request, body) / 1000.0
    first, middle, finish = _EVENTS[include_usage]
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    await resp.prepare(request)
    for i in range(n):
        if delay and i:
            await asyncio.sleep(delay)
        await resp.write(first if i == 0 else middle)
    await resp.write(finish)
    if include_usage:
        await resp.write(_usage_event(n))
    await resp.write(_DONE)
    await resp.write_eof()
    return resp


async def metrics(request: web.Request) -> web.Response:
    mj = (time.monotonic() - _START) * POWER_W * 1000.0
    text = (
        "# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).\n"
        "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n"
        f'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{gpu="0",UUID="GPU-fast-0",modelName="NVIDIA H100 80GB HBM3"}} '
        f"{mj:.0f}\n"
        "# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).\n"
        "# TYPE DCGM_FI_DEV_POWER_USAGE gauge\n"
        f'DCGM_FI_DEV_POWER_USAGE{{gpu="0",UUID="GPU-fast-0",modelName="NVIDIA H100 80GB HBM3"}} {POWER_W:.1f}\n'
    )
    return web.Response(text=text, content_type="text/plain")


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    return app


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(make_app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096, reuse_address=True).start()
    try:
        await wait_for_signal()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
