"""How long the proxy's event loop stalls while one bad input is in flight.

Method
------
Four processes on one machine:

- a misbehaving upstream (this file, ``--upstream PORT``): by the request's ``X-Bad`` header it
  rejects the request with a 400 that carries no usage (the proxy then counts the prompt itself),
  streams one huge SSE event, answers a gzip bomb (a small compressed body of a huge completion) or a
  huge plain body; ``GET /metrics`` is a DCGM-style energy counter for ``--meter simulated``.
- the proxy, ``scer-proxy serve --meter simulated`` (this interpreter's ``scer_proxy``, in a scratch
  directory, no ``SCER_*`` variables) run through a wrapper of this file's that adds a 1 ms ticker
  to its event loop (a task that sleeps 1 ms and records how late it woke: the issue's measure;
  nothing the product carries), on a ledger filled beforehand with ``--rows`` records of
  ``--models`` models over two days (the real ``put`` and writer path), so that ``/scer/requests``,
  ``/scer/summary`` and ``/metrics`` (one series per model and label) have something to read.
- this process, the prober, and a sender forked from it. The prober sends ``GET /scer/health``
  (tiny, no ledger read) every ``--interval-ms`` ms (5) on a schedule of its own, whether or not the
  earlier ones have answered (open loop: a stall is not hidden by probes never sent), and takes each
  probe's latency from its scheduled time to its answer: the loop's lag at that moment plus the
  probe's own handling. It bounds the ticker's lag from above: while a read thread shares the GIL
  with the loop, the loop serves requests more slowly, and probes sent faster than it serves them
  queue (at 2 ms on 2 cores the probes saw 138 ms at p99 where the ticker saw at most 44 ms). The
  sender, forked before anything else starts, sends one bad input at a time (blocking httpx, the
  answer read and dropped in 1 MiB pieces), so that reading a 200 MB answer does not hold up the
  prober's loop through the GIL; the prober's own loop lag is printed beside each row as a check.

Each input is sent ``--repeat`` times (3); its row gives the answers' status and median time, the
ticks that began while one was in flight with the loop's lag at each millisecond of that time (p99
and max: weighted by time, as the probes are), and the probes scheduled meanwhile (count, p50, p99
and max latency). Target (issue 14): the ticker's p99 under 50 ms with each input in flight (the
probes' with ``--proxy-cmd``, which runs another proxy without the ticker: another checkout, say).
The first row is the idle baseline.

Usage: ``python bench/loop_lag.py [--quick] [--json FILE] [--only NAME ...]``. ``--quick`` shrinks
every input (a smoke run of a few seconds). A benchmark, not a test: it prints figures with the target
beside them and exits 0 unless the setup itself fails.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import ctypes
import dataclasses
import json
import logging
import multiprocessing
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

# The scer_proxy measured: this checkout's, or the one ``--checkout`` names (set for the proxy's process).
sys.path.insert(0, os.environ.get("LOOP_LAG_CHECKOUT") or str(Path(__file__).resolve().parents[1]))

import aiohttp
import httpx
import orjson
import structlog
from aiohttp import web

from scer_proxy.carbon.records import Record
from scer_proxy.ledger.sqlite import SqliteLedger
from scer_proxy.proxy.serving import free_port, wait_for_signal

TARGET_P99_MS = 50.0
MODEL = "bad-model"
POWER_W = 300.0
MIB = 1 << 20


@dataclass(frozen=True)
class Sizes:
    prompt_mb: float = 8.0  # the prompt the upstream rejects without usage
    sse_event_mb: float = 16.0  # one SSE event's size
    bomb_mib: int = 256  # what the gzip bomb inflates to
    body_mb: float = 200.0  # a plain non-streamed body
    rows: int = 100_000  # ledger records
    models: int = 1_000  # distinct models among them (series of /metrics, rows of the summary)
    limit: int = 10_000  # /scer/requests?limit=


QUICK = Sizes(prompt_mb=0.5, sse_event_mb=1.0, bomb_mib=16, body_mb=8.0, rows=5_000, models=100, limit=2_000)


class BenchError(Exception):
    pass


# ---------------------------------------------------------------------------------------------------
# The misbehaving upstream (its own process).
_START = time.monotonic()


def _chunk_event(content: str, finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-bad",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def _completion(content: str) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bad",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": MODEL,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10},
        }
    )


def _gzip_bomb(inflated_mib: int) -> bytes:
    """A gzip body that inflates to a completion of ``inflated_mib`` MiB (streamed compression: the
    inflated text is never held whole here)."""
    head, tail = _completion("\0").split(b"\\u0000")
    comp = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip framing
    parts = [comp.compress(head)]
    block = b"a" * MIB
    for _ in range(inflated_mib):
        parts.append(comp.compress(block))
    parts.append(comp.compress(tail))
    parts.append(comp.flush())
    return b"".join(parts)


def make_upstream_app(sizes: Sizes) -> web.Application:
    sse_event = _chunk_event("x" * int(sizes.sse_event_mb * 1_000_000))
    bomb = _gzip_bomb(sizes.bomb_mib)
    body = _completion("b" * int(sizes.body_mb * 1_000_000))
    usage_event = (
        b'data: {"id":"chatcmpl-bad","object":"chat.completion.chunk","created":1700000000,'
        b'"model":"' + MODEL.encode() + b'","choices":[],'
        b'"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}\n\n'
    )

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        bad = request.headers.get("X-Bad", "")
        if bad == "reject":  # an error without usage: the proxy counts the prompt itself
            return web.json_response(
                {"error": {"message": "no", "type": "invalid_request_error"}}, status=400
            )
        if bad == "gzip-bomb":
            return web.Response(
                body=bomb, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
            )
        if bad == "big-body":
            return web.Response(body=body, content_type="application/json")
        if bad == "big-sse":
            resp = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await resp.prepare(request)
            await resp.write(_chunk_event(""))
            for i in range(0, len(sse_event), 64 * 1024):  # in pieces, as a network delivers it
                await resp.write(sse_event[i : i + 64 * 1024])
            await resp.write(_chunk_event("", "stop"))
            await resp.write(usage_event)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        return web.Response(body=_completion("ok"), content_type="application/json")

    async def metrics(request: web.Request) -> web.Response:
        mj = (time.monotonic() - _START) * POWER_W * 1000.0
        return web.Response(
            text=(
                "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n"
                f'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{gpu="0",modelName="NVIDIA H100 80GB HBM3"}} {mj:.0f}\n'
                "# TYPE DCGM_FI_DEV_POWER_USAGE gauge\n"
                f'DCGM_FI_DEV_POWER_USAGE{{gpu="0",modelName="NVIDIA H100 80GB HBM3"}} {POWER_W:.1f}\n'
            ),
            content_type="text/plain",
        )

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=64 * MIB)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health)
    return app


async def serve_upstream(port: int, sizes: Sizes) -> None:
    runner = web.AppRunner(
        make_upstream_app(sizes), access_log=None, handle_signals=False, shutdown_timeout=1.0
    )
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    try:
        await wait_for_signal()
    finally:
        await runner.cleanup()


# ---------------------------------------------------------------------------------------------------
# The ledger, filled before the proxy starts.
def fill_ledger(path: Path, sizes: Sizes) -> None:
    rng = random.Random(0)
    now = time.time()

    def record(i: int) -> Record:
        energy = rng.uniform(5, 400)
        return Record(
            request_id=f"scer-{i:032x}",
            model=f"model-{i % sizes.models:05d}",
            upstream="default",
            tenant=f"key-{i % 20:04d}",
            endpoint="chat.completions",
            stream=bool(i & 1),
            started_at=now - 2 * 86400 * (1 - i / sizes.rows),
            ended_at=now,
            status="ok" if i % 10 else "upstream_error",
            http_status=200,
            prompt_tokens=rng.randint(10, 2000),
            completion_tokens=rng.randint(1, 1000),
            token_source="upstream",
            energy_j=energy,
            energy_gpu_j=energy,
            energy_prefill_j=energy / 4,
            energy_decode_j=energy * 3 / 4,
            energy_source="simulated",
            energy_uncertainty_rel=0.08,
            hardware_s=1.0,
            carbon_g=energy * 0.1,
            carbon_operational_g=energy * 0.09,
            carbon_embodied_g=energy * 0.01,
            grid_intensity_g_per_kwh=369.0,
            grid_source="static:USA",
            sci=1.0,
            settled=True,
        )

    async def run() -> None:
        ledger = SqliteLedger(path, flush_interval_s=0.05, max_pending=sizes.rows + 1)
        await ledger.open()
        for i in range(sizes.rows):
            ledger.put(record(i))
            if i % 20_000 == 19_999:
                await ledger.flush()
        await ledger.close()

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # no migrations
    asyncio.run(run())


# ---------------------------------------------------------------------------------------------------
# Child processes.
def _die_with_parent() -> None:
    """In the child: receive SIGTERM when the benchmark dies, even by SIGKILL (Linux only)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@contextlib.contextmanager
def children(scratch: Path) -> Iterator[Callable[..., Child]]:
    started: list[Child] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCER_")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])

    def start(name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> Child:
        log_path = scratch / f"{name}.log"
        with log_path.open("wb") as log_file:
            proc = subprocess.Popen(
                argv,
                cwd=scratch,
                env=env | (extra_env or {}),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        child = Child(name, proc, log_path)
        started.append(child)
        return child

    try:
        yield start
    finally:
        for child in reversed(started):
            child.stop()


def wait_ready(child: Child, url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise BenchError(f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise BenchError(f"{child.name} did not answer {url} within {timeout_s:.0f} s:\n{child.log_tail()}")


# ---------------------------------------------------------------------------------------------------
# The bad inputs, sent from a thread (blocking httpx; the answer read and dropped).
@dataclass(frozen=True)
class Input:
    name: str
    label: str
    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None = None
    stream: bool = False


def inputs(sizes: Sizes) -> list[Input]:
    rng = random.Random(1)
    words = ["river", "energy", "carbon", "token", "model", "grid", "watt", "joule", "proxy", "meter"]
    prompt_words: list[str] = []
    size = 0
    target = int(sizes.prompt_mb * 1_000_000)
    while size < target:
        w = rng.choice(words) + str(rng.randint(0, 999))
        prompt_words.append(w)
        size += len(w) + 1
    prompt = " ".join(prompt_words)
    chat = {"Content-Type": "application/json"}

    def body(content: str, stream: bool) -> bytes:
        payload: dict[str, object] = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
        if stream:
            payload |= {"stream": True, "stream_options": {"include_usage": True}}
        return orjson.dumps(payload)

    return [
        Input(
            "prompt",
            f"{sizes.prompt_mb:g} MB prompt, upstream 400 without usage",
            "POST",
            "/v1/chat/completions",
            chat | {"X-Bad": "reject"},
            body(prompt, False),
        ),
        Input(
            "sse",
            f"one {sizes.sse_event_mb:g} MB SSE event",
            "POST",
            "/v1/chat/completions",
            chat | {"X-Bad": "big-sse"},
            body("hi", True),
            stream=True,
        ),
        Input(
            "bomb",
            f"gzip bomb ({sizes.bomb_mib} MiB inflated)",
            "POST",
            "/v1/chat/completions",
            chat | {"X-Bad": "gzip-bomb"},
            body("hi", False),
        ),
        Input(
            "body",
            f"{sizes.body_mb:g} MB non-streamed body",
            "POST",
            "/v1/chat/completions",
            chat | {"X-Bad": "big-body"},
            body("hi", False),
        ),
        Input(
            "requests",
            f"/scer/requests?limit={sizes.limit} ({sizes.rows:,} rows)",
            "GET",
            f"/scer/requests?limit={sizes.limit}",
            {},
        ),
        Input("summary", f"/scer/summary ({sizes.models:,} models)", "GET", "/scer/summary", {}),
        Input("metrics", f"/metrics ({sizes.models:,} models' series)", "GET", "/metrics", {}),
    ]


@dataclass
class Sent:
    status: int | str
    took_s: float
    bytes_read: int


def _sender(conn: Connection, base: str, timeout_s: float) -> None:
    """The sender process: each input received is sent, and its result and window sent back."""
    while (item := conn.recv()) is not None:
        start = time.perf_counter()  # CLOCK_MONOTONIC: the same clock as the prober's process
        sent = send(base, item, timeout_s)
        conn.send((sent, start, time.perf_counter()))


def send(base: str, item: Input, timeout_s: float) -> Sent:
    """One bad input, the whole answer read and dropped; a failure is its status, never raised."""
    t0 = time.perf_counter()
    read = 0
    try:
        with (
            httpx.Client(base_url=base, timeout=timeout_s) as client,
            client.stream(item.method, item.path, headers=item.headers, content=item.body) as resp,
        ):
            for piece in resp.iter_raw(MIB):
                read += len(piece)
            status: int | str = resp.status_code
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    return Sent(status, time.perf_counter() - t0, read)


# ---------------------------------------------------------------------------------------------------
# The prober: open loop, every interval, latency from the scheduled time.
class Prober:
    def __init__(self, url: str, interval_s: float) -> None:
        self.url = url
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []  # (scheduled, latency s)
        self.self_lag: list[tuple[float, float]] = []  # (time, the prober loop's own lag s)
        self._stop = asyncio.Event()

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(limit=64)
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            pending: set[asyncio.Task[None]] = set()
            due = time.perf_counter()
            while not self._stop.is_set():
                now = time.perf_counter()
                if now >= due:
                    self.self_lag.append((due, now - due))
                    task = asyncio.create_task(self._probe(session, due))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                    due += self.interval_s
                    if now - due > 1.0:  # the prober itself fell behind by a second: resynchronize
                        due = now
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
            if pending:
                await asyncio.wait(pending, timeout=60)

    async def _probe(self, session: aiohttp.ClientSession, scheduled: float) -> None:
        try:
            async with session.get(self.url) as resp:
                await resp.read()
            self.samples.append((scheduled, time.perf_counter() - scheduled))
        except (aiohttp.ClientError, TimeoutError):
            self.samples.append((scheduled, float("inf")))

    def stop(self) -> None:
        self._stop.set()

    def window(self, start: float, end: float) -> list[float]:
        return [lat for t, lat in self.samples if start <= t < end]

    def self_window(self, start: float, end: float) -> list[float]:
        return [lag for t, lag in self.self_lag if start <= t < end]


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# ---------------------------------------------------------------------------------------------------
# The 1 ms ticker inside the proxy: a wrapper of this benchmark's, nothing the product carries.
def serve_with_ticker(out: Path, argv: list[str]) -> int:
    """Run ``scer-proxy <argv>`` with a task on its loop that sleeps 1 ms and records how late it woke
    (perf_counter, the machine's monotonic clock); the ticks are written to ``out`` at shutdown."""
    from scer_proxy import app as app_module
    from scer_proxy.cli.main import main as cli_main

    ticks: list[tuple[float, float]] = []  # (when the tick began, its lag s)
    tasks: list[asyncio.Task[None]] = []
    original = app_module.create_app

    async def tick() -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            ticks.append((t0, time.perf_counter() - t0 - 0.001))

    def create_app(*args: object, **kwargs: object) -> web.Application:
        app = original(*args, **kwargs)  # type: ignore[arg-type]

        async def start(_app: web.Application) -> None:
            tasks.append(asyncio.get_running_loop().create_task(tick()))

        async def stop(_app: web.Application) -> None:
            for task in tasks:
                task.cancel()
            await asyncio.to_thread(out.write_bytes, orjson.dumps(ticks))

        app.on_startup.append(start)
        app.on_shutdown.append(stop)
        return app

    app_module.create_app = create_app
    return cli_main(argv)


def ticker_lags(
    ticks: list[tuple[float, float]], windows: list[tuple[float, float]]
) -> tuple[int, list[float]]:
    """The ticks that began in ``windows``, and the loop's lag sampled every millisecond of them.

    Weighted by time, not by tick: a stall of 500 ms is one tick but half a second in which every
    callback waits, so at each millisecond ``t`` the lag is how long a callback due then waited for
    the tick that was pending at ``t`` to wake (``wake - t``, ``wake - (begin + 1 ms)`` before the tick
    was due). One tick of 570 ms in 5.5 s of windows is then 10 % of the time, not 1 tick in 2,300.
    """
    ticks = sorted(ticks)
    starts = [t for t, _lag in ticks]
    count = 0
    samples: list[float] = []
    for a, b in windows:
        count += bisect.bisect_left(starts, b) - bisect.bisect_left(starts, a)
        t = a
        while t < b:
            i = bisect.bisect_right(starts, t) - 1  # the last tick begun at or before t
            if i >= 0:
                begun, lag = ticks[i]
                wake = begun + 0.001 + lag
                samples.append(max(0.0, wake - max(t, begun + 0.001)) if t < wake else 0.0)
            t += 0.001
    return count, samples


@dataclass
class Row:
    name: str
    label: str
    status: int | str
    took_s: float
    probes: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    prober_p99_ms: float
    windows: list[tuple[float, float]]
    ticks: int = 0
    ticker_p99_ms: float = float("nan")
    ticker_max_ms: float = float("nan")

    @property
    def lag_p99_ms(self) -> float:
        """The figure the target is on: the ticker's p99 where it ran, else the probes'."""
        return self.ticker_p99_ms if self.ticks else self.p99_ms

    @property
    def met(self) -> bool:
        return self.lag_p99_ms < TARGET_P99_MS


def _row(
    name: str,
    label: str,
    sent: list[Sent],
    lat: list[float],
    own: list[float],
    windows: list[tuple[float, float]],
) -> Row:
    statuses = sorted({str(s.status) for s in sent})
    return Row(
        name,
        label,
        statuses[0] if len(statuses) == 1 else ",".join(statuses),
        statistics.median(s.took_s for s in sent),
        len(lat),
        quantile(lat, 0.5) * 1000,
        quantile(lat, 0.99) * 1000,
        (max(lat) if lat else float("nan")) * 1000,
        quantile(own, 0.99) * 1000,
        windows,
    )


def add_ticks(rows: list[Row], ticks: list[tuple[float, float]]) -> None:
    for row in rows:
        row.ticks, lags = ticker_lags(ticks, row.windows)
        row.ticker_p99_ms = quantile(lags, 0.99) * 1000
        row.ticker_max_ms = (max(lags) if lags else float("nan")) * 1000


async def measure(
    proxy: str, items: list[Input], interval_s: float, idle_s: float, repeat: int, sender: Connection
) -> list[Row]:
    prober = Prober(proxy + "/scer/health", interval_s)
    probing = asyncio.create_task(prober.run())
    rows: list[Row] = []
    try:
        await asyncio.sleep(0.5)  # warm: the prober's connections open
        t0 = time.perf_counter()
        await asyncio.sleep(idle_s)
        t1 = time.perf_counter()
        idle = [Sent("-", t1 - t0, 0)]
        rows.append(
            _row(
                "idle",
                "idle (nothing in flight)",
                idle,
                prober.window(t0, t1),
                prober.self_window(t0, t1),
                [(t0, t1)],
            )
        )
        for item in items:
            sent: list[Sent] = []
            lat: list[float] = []
            own: list[float] = []
            windows: list[tuple[float, float]] = []
            for _ in range(repeat):
                await asyncio.sleep(0.5)  # the answers to the previous input drain
                sender.send(item)
                one, start, end = await asyncio.to_thread(sender.recv)
                await asyncio.sleep(0.2)  # probes scheduled in the window answer
                sent.append(one)
                windows.append((start, end))
                lat += prober.window(start, end)
                own += prober.self_window(start, end)
                print(f"  {item.label}: {one.status} in {one.took_s:.2f} s", file=sys.stderr, flush=True)
            rows.append(_row(item.name, item.label, sent, lat, own, windows))
    finally:
        prober.stop()
        await probing
    return rows


def table(rows: list[Row]) -> str:
    header = (
        "input",
        "status",
        "took s",
        "ticks",
        "tick p99",
        "tick max",
        "probes",
        "probe p50",
        "probe p99",
        "probe max",
        "p99 < 50",
        "prober p99",
    )
    body = [
        (
            r.label,
            str(r.status),
            f"{r.took_s:.2f}",
            str(r.ticks) if r.ticks else "-",
            f"{r.ticker_p99_ms:.1f}" if r.ticks else "-",
            f"{r.ticker_max_ms:.1f}" if r.ticks else "-",
            str(r.probes),
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            f"{r.max_ms:.1f}",
            "met" if r.met else "MISSED",
            f"{r.prober_p99_ms:.1f}",
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in (header, *body)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(b) for b in body)])


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-with-ticker":  # the proxy's mode: FILE then serve's argv
        return serve_with_ticker(Path(sys.argv[2]), sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the child's mode
    parser.add_argument("--sizes", help=argparse.SUPPRESS)  # JSON of Sizes, for the child
    parser.add_argument("--quick", action="store_true", help="small inputs: a smoke run of a few seconds")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="prompt sse bomb body requests summary metrics"
    )
    parser.add_argument("--interval-ms", type=float, default=5.0, help="probe interval (default 5 ms)")
    parser.add_argument("--repeat", type=int, default=3, help="times each input is sent (default 3)")
    parser.add_argument("--idle-s", type=float, default=2.0, help="the idle baseline's length")
    parser.add_argument("--timeout-s", type=float, default=90.0, help="the longest one input may take")
    parser.add_argument(
        "--proxy-cmd",
        help="how to run the proxy (default: this interpreter's scer_proxy, with the 1 ms ticker inside; "
        "another command is measured by the probes alone)",
    )
    parser.add_argument(
        "--checkout",
        help="measure the scer_proxy of this checkout (with the ticker), e.g. main's, for a before",
    )
    parser.add_argument("--json", help="also write the rows to this file")
    for field in dataclasses.fields(Sizes):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}", type=type(field.default), help=f"default {field.default}"
        )
    args = parser.parse_args()

    sizes = QUICK if args.quick else Sizes()
    sizes = dataclasses.replace(
        sizes,
        **{
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(Sizes)
            if getattr(args, f.name) is not None
        },
    )
    if args.upstream is not None:
        if args.sizes:
            sizes = Sizes(**json.loads(args.sizes))
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_upstream(args.upstream, sizes))
        return 0

    items = [i for i in inputs(sizes) if not args.only or i.name in args.only]
    try:
        with tempfile.TemporaryDirectory(prefix="scer-looplag-") as tmp:
            scratch = Path(tmp)
            ticks_path = scratch / "ticks.json"
            t0 = time.perf_counter()
            fill_ledger(scratch / "ledger.db", sizes)
            print(
                f"ledger: {sizes.rows:,} records of {sizes.models:,} models in {time.perf_counter() - t0:.1f} s",
                file=sys.stderr,
            )
            with children(scratch) as start:
                up_port, proxy_port = free_port(), free_port()
                upstream = start(
                    "upstream",
                    [
                        sys.executable,
                        __file__,
                        "--upstream",
                        str(up_port),
                        "--sizes",
                        json.dumps(dataclasses.asdict(sizes)),
                    ],
                )
                wait_ready(upstream, f"http://127.0.0.1:{up_port}/health")
                proxy_cmd = (
                    args.proxy_cmd.split()
                    if args.proxy_cmd
                    else [sys.executable, __file__, "--serve-with-ticker", str(ticks_path)]
                )
                proxy = start(
                    "proxy",
                    [
                        *proxy_cmd,
                        "serve",
                        "--upstream",
                        f"http://127.0.0.1:{up_port}",
                        "--meter",
                        "simulated",
                        "--listen",
                        f"127.0.0.1:{proxy_port}",
                        "--db",
                        str(scratch / "ledger.db"),
                        "--log-level",
                        "warning",
                    ],
                    {"LOOP_LAG_CHECKOUT": str(Path(args.checkout).resolve())} if args.checkout else None,
                )
                base = f"http://127.0.0.1:{proxy_port}"
                wait_ready(proxy, base + "/scer/health")
                fork = multiprocessing.get_context("fork")
                here, there = fork.Pipe()
                sending = fork.Process(target=_sender, args=(there, base, args.timeout_s), daemon=True)
                sending.start()  # before this process starts a thread (asyncio's, httpx's)
                try:
                    rows = asyncio.run(
                        measure(base, items, args.interval_ms / 1000.0, args.idle_s, args.repeat, here)
                    )
                finally:
                    here.send(None)
                    sending.join(10)
                if proxy.proc.poll() is not None:
                    raise BenchError(f"the proxy exited with {proxy.proc.returncode}:\n{proxy.log_tail()}")
                proxy.stop()  # its shutdown writes the ticks
            if not args.proxy_cmd:
                if not ticks_path.exists():
                    raise BenchError(f"the proxy wrote no ticks:\n{proxy.log_tail()}")
                add_ticks(rows, [tuple(t) for t in orjson.loads(ticks_path.read_bytes())])
    except BenchError as exc:
        print(f"loop_lag: {exc}", file=sys.stderr)
        return 1
    print(
        "\nThe proxy's loop lag in ms with each input in flight: a 1 ms ticker on its loop (tick), and "
        f"GET /scer/health every {args.interval_ms:g} ms\nfrom outside (probe, open loop); prober p99: "
        "the prober's own loop lag, a check:\n"
    )
    print(table(rows))
    missed = [r.label for r in rows if not r.met]
    on = "the ticker's" if not args.proxy_cmd else "the probes'"
    print(
        f"\ntarget p99 < {TARGET_P99_MS:g} ms ({on}): "
        + ("met by every row" if not missed else "missed by " + "; ".join(missed))
    )
    if args.json:
        out = [dataclasses.asdict(r) | {"met": r.met} for r in rows]
        for r in out:
            r.pop("windows")
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
