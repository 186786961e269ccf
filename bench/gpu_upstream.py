"""An OpenAI-compatible upstream whose tokens cost real GPU work: the load for ``bench/gpu_serve_check.py``.

Run as its own process: ``python bench/gpu_upstream.py PORT [--cpu]``. It is not a language model: it
is an engine shaped like one, so that a real energy counter sees what it sees under an inference
server, and the text it returns is filler. Weights of a decoder of ``--layers`` layers (two matrices
of ``--dim`` x 4 ``--dim`` each, bf16: 8 GiB at the defaults, about the size of an 8B model's) stay on
the GPU. One engine task runs continuous batching: requests join at the next step; a joining request's
prompt runs through every layer as one batch (prefill, compute-bound); then every step runs one row per
running sequence through every layer (decode, bound by reading the weights) and gives each one token.
A request ends after ``max_tokens`` tokens (there is no end-of-sequence token: ``ignore_eos`` always).

- ``POST /v1/chat/completions``: non-streamed (with ``usage``) or streamed (one chunk a token; the
  usage chunk when ``stream_options.include_usage``), prompt tokens counted with the proxy's tokenizer.
- ``GET /health``: 200. ``GET /v1/models``: the one model.
- ``--cpu``: the same engine in numpy on the CPU with small matrices, and a modelled DCGM-style energy
  counter at ``/metrics`` (60 W idle, 300 W while a step runs), so the check can be dry-run on a machine
  with no GPU (the proxy then meters with ``--meter simulated``). ``GET /metrics/model`` gives the
  model itself (the powers, the start and every busy span, in ``time.monotonic`` seconds), from which
  the check computes the counter exactly at any past instant.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvloop
from aiohttp import web

from scer_proxy.proxy.serving import serve_until_signal
from scer_proxy.wire import tokens

MODEL = "gpu-load-8b"
TOKEN = " tok"
IDLE_W, BUSY_W = 60.0, 300.0  # the --cpu counter's model


class Weights:
    """The decoder's matrices and its two passes, on the GPU (torch, bf16) or the CPU (numpy, float32)."""

    def __init__(self, *, cpu: bool, dim: int, layers: int) -> None:
        self.cpu, self.dim = cpu, dim
        if cpu:
            import numpy as np

            rng = np.random.default_rng(0)
            self.np = np
            self.layers = [
                (
                    rng.standard_normal((dim, 4 * dim), dtype=np.float32) / dim**0.5,
                    rng.standard_normal((4 * dim, dim), dtype=np.float32) / (4 * dim) ** 0.5,
                )
                for _ in range(layers)
            ]
        else:
            import torch

            self.torch = torch
            gen = torch.Generator(device="cuda").manual_seed(0)
            # Scaled so that activations keep their size through the layers (zeros would draw less power).
            self.layers = [
                (
                    torch.randn(dim, 4 * dim, device="cuda", dtype=torch.bfloat16, generator=gen) / dim**0.5,
                    torch.randn(4 * dim, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
                    / (4 * dim) ** 0.5,
                )
                for _ in range(layers)
            ]
            torch.cuda.synchronize()

    def run(self, rows: int) -> None:
        """``rows`` token positions through every layer, waiting for the device to finish."""
        if self.cpu:
            x = self.np.ones((rows, self.dim), dtype=self.np.float32)
            for up, down in self.layers:
                x = (x @ up) @ down
            return
        torch = self.torch
        x = torch.ones(rows, self.dim, device="cuda", dtype=torch.bfloat16)
        for up, down in self.layers:
            x = (x @ up) @ down
        torch.cuda.synchronize()


@dataclass
class Sequence:
    prompt_tokens: int
    max_tokens: int
    out: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)
    produced: int = 0


class Engine:
    """Continuous batching over :class:`Weights`; the passes run in a worker thread (torch and numpy
    release the GIL), so the event loop keeps serving while the device works."""

    def __init__(self, weights: Weights, max_batch: int = 64) -> None:
        self.weights = weights
        self.max_batch = max_batch
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.wake = asyncio.Event()
        self.busy_s = 0.0  # for the --cpu counter
        self.busy_spans: list[tuple[float, float]] = []  # (start, end) of every step, for /metrics/model
        self._lock = threading.Lock()
        self._busy_since: float | None = None

    def submit(self, seq: Sequence) -> None:
        self.waiting.append(seq)
        self.wake.set()

    def busy_seconds(self) -> float:
        with self._lock:
            return self.busy_s + (
                time.monotonic() - self._busy_since if self._busy_since is not None else 0.0
            )

    def busy_history(self) -> list[tuple[float, float]]:
        """Every step's (start, end), the one running to now included."""
        with self._lock:
            running = [(self._busy_since, time.monotonic())] if self._busy_since is not None else []
            return [*self.busy_spans, *running]

    def _timed(self, rows: int) -> None:
        with self._lock:
            self._busy_since = time.monotonic()
        self.weights.run(rows)
        with self._lock:
            assert self._busy_since is not None
            now = time.monotonic()
            self.busy_s += now - self._busy_since
            self.busy_spans.append((self._busy_since, now))
            self._busy_since = None

    async def run(self) -> None:
        while True:
            if not self.waiting and not self.running:
                self.wake.clear()
                await self.wake.wait()
            room = self.max_batch - len(self.running)
            joining, self.waiting = self.waiting[:room], self.waiting[room:]
            if joining:
                await asyncio.to_thread(self._timed, sum(s.prompt_tokens for s in joining))
                self.running.extend(joining)
            await asyncio.to_thread(self._timed, len(self.running))
            still: list[Sequence] = []
            for seq in self.running:
                seq.produced += 1
                seq.out.put_nowait(seq.produced)
                if seq.produced >= seq.max_tokens:
                    seq.out.put_nowait(None)
                else:
                    still.append(seq)
            self.running = still


def _chunk(delta: dict[str, str], finish: str | None) -> bytes:
    return (
        b"data: "
        + orjson.dumps(
            {
                "id": "chatcmpl-gpu",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": MODEL,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
        )
        + b"\n\n"
    )


async def chat(request: web.Request) -> web.StreamResponse:
    body = orjson.loads(await request.read())
    max_tokens = body.get("max_tokens")
    seq = Sequence(
        prompt_tokens=max(1, tokens.count_prompt("chat", body)),
        max_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 16,
    )
    usage = {
        "prompt_tokens": seq.prompt_tokens,
        "completion_tokens": seq.max_tokens,
        "total_tokens": seq.prompt_tokens + seq.max_tokens,
    }
    engine: Engine = request.app["engine"]
    engine.submit(seq)
    if not body.get("stream"):
        while await seq.out.get() is not None:
            pass
        return web.json_response(
            {
                "id": "chatcmpl-gpu",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": MODEL,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": TOKEN * seq.max_tokens},
                        "finish_reason": "length",
                    }
                ],
                "usage": usage,
            },
            dumps=lambda v: orjson.dumps(v).decode(),
        )
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    while (n := await seq.out.get()) is not None:
        await resp.write(
            _chunk({"role": "assistant", "content": TOKEN} if n == 1 else {"content": TOKEN}, None)
        )
    await resp.write(_chunk({}, "length"))
    if include_usage:
        await resp.write(
            b"data: "
            + orjson.dumps(
                {
                    "id": "chatcmpl-gpu",
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": MODEL,
                    "choices": [],
                    "usage": usage,
                }
            )
            + b"\n\n"
        )
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def metrics(request: web.Request) -> web.Response:
    """The --cpu run's modelled counter (mJ), in the DCGM exporter's format."""
    engine: Engine = request.app["engine"]
    busy = engine.busy_seconds()
    mj = ((time.monotonic() - request.app["started"]) * IDLE_W + busy * (BUSY_W - IDLE_W)) * 1000.0
    return web.Response(
        text=(
            "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n"
            f'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{gpu="0",UUID="GPU-cpu-0",modelName="CPU stand-in"}} {mj:.0f}\n'
        ),
        content_type="text/plain",
    )


async def metrics_model(request: web.Request) -> web.Response:
    """The --cpu counter's model: its value at t is idle_w * (t - started_s) plus (busy_w - idle_w) times
    the busy seconds before t (joules; times in this machine's ``time.monotonic`` seconds)."""
    engine: Engine = request.app["engine"]
    return web.Response(
        body=orjson.dumps(
            {
                "idle_w": IDLE_W,
                "busy_w": BUSY_W,
                "started_s": request.app["started"],
                "busy_spans_s": engine.busy_history(),
            }
        ),
        content_type="application/json",
    )


async def models(request: web.Request) -> web.Response:
    return web.json_response(
        {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]}
    )


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app(weights: Weights, *, cpu: bool) -> web.Application:
    app = web.Application()
    app["started"] = time.monotonic()

    async def engine_ctx(app: web.Application) -> Any:
        engine = Engine(weights)
        app["engine"] = engine
        task = asyncio.create_task(engine.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(engine_ctx)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    if cpu:
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/metrics/model", metrics_model)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("port", type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--cpu", action="store_true", help="numpy on the CPU and a modelled counter (dry run)"
    )
    parser.add_argument(
        "--dim", type=int, default=0, help="model width (default 4096 on the GPU, 512 on the CPU)"
    )
    parser.add_argument("--layers", type=int, default=0, help="layers (default 32 on the GPU, 4 on the CPU)")
    args = parser.parse_args()
    weights = Weights(
        cpu=args.cpu,
        dim=args.dim or (512 if args.cpu else 4096),
        layers=args.layers or (4 if args.cpu else 32),
    )
    tokens.encoding()  # loaded before serving, as the proxy does
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(
            serve_until_signal(make_app(weights, cpu=args.cpu), args.host, args.port, shutdown_timeout=1.0)
        )


if __name__ == "__main__":
    main()
