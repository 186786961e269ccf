"""What the proxy costs: the same requests sent direct to a fast upstream and through the proxy, side by side.

Method
------
Four processes on one machine:

- ``bench/fast_upstream.py``: a trivial OpenAI-compatible upstream (aiohttp on uvloop) that answers
  at once, streams N chunks with an optional per-chunk delay, and exposes a DCGM-style energy counter
  at ``/metrics`` (300 W of wall time), so the proxy's ``--meter simulated`` metering path is live.
- the proxy: ``scer-proxy serve --upstream <fast upstream> --meter simulated --log-level warning``
  (run as ``python -m scer_proxy`` from this interpreter, in a scratch directory, without any
  ``SCER_*`` variables from the environment).
- ``bench/bare_relay.py``: the least an aiohttp reverse proxy can do (the proxy's server and client
  stack and its hop-by-hop handling, nothing else), set beside the proxy in the non-streamed phases as
  "relay": what it adds over direct calls is the price of the stack, below which no proxy built on it
  can go.
- this process, the load generator: one aiohttp client session (a keep-alive pool) per target, on
  uvloop. "direct" sends to the upstream, "proxy" to the proxy, "relay" to the bare relay; everything
  else is identical.

Every phase runs in rounds that alternate the targets' order (direct-proxy-relay, then relay-proxy-
direct, ...; the streamed phases have no relay), so drift (CPU frequency, other load, heap growth)
touches all alike. Every path is warmed up first.
Latencies are ``time.perf_counter()`` from just before the request is sent to the last byte read (or
the first body byte, for time to first token). Added latency is the proxy's percentile minus the
direct one at the same percentile. The gap between chunks is measured from the client's read
timestamps over the content chunks of streams sent with a small per-chunk delay (chunks that
arrive coalesced in one read count a gap of 0). Proxy CPU comes from ``/proc/PID/stat``
(utime + stime, 10 ms ticks) across a streaming run of known chunk count, less the proxy's idle
CPU (its meter polls the upstream's ``/metrics``) over the same wall time. Memory is VmRSS and
VmHWM from ``/proc/PID/status``.

All the processes share the machine's cores (the relay idles while the proxy is measured, and the
other way round), so throughput at concurrency 64 is bounded by the CPU the load generator and upstream
leave to the proxy; the CPU split is printed beside it.

A/B runs: ``--b-proxy-cmd CMD`` starts a second proxy from another command (another checkout, say
``env PYTHONPATH=<worktree> python -m scer_proxy``) and measures it as "proxy B" beside the first in
the non-streamed phases, in the same alternating rounds, so the two are compared under the same drift.

Usage: ``python bench/overhead.py [--quick] [--json FILE] [--proxy-cmd CMD] [--b-proxy-cmd CMD]``.
A benchmark, not a test: it prints figures with the targets beside them and exits 0 unless the setup
itself fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import json
import math
import os
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import uvloop

from scer_proxy.proxy.serving import free_port

HERE = Path(__file__).resolve().parent
UPSTREAM_SCRIPT = HERE / "fast_upstream.py"
RELAY_SCRIPT = HERE / "bare_relay.py"
MODEL = "fast-model"
PROXY_B = "proxy-b"  # a second proxy beside the first (--b-proxy-cmd), for A/B runs in one process tree
GAP_DELAY_MS = 5.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

# Targets printed beside the figures.
TARGET_C1_P50_ADDED_MS = 0.5
TARGET_C1_P99_ADDED_MS = 2.0
TARGET_THROUGHPUT_SHARE = 0.60

T = TypeVar("T")


class BenchError(RuntimeError):
    """The benchmark could not be set up (a child process failed to start)."""


# ---------------------------------------------------------------------------------------------------
# Sizes of each phase: full run and --quick smoke run.
@dataclass(frozen=True)
class Plan:
    warmup_requests: int
    c1_rounds: int
    c1_requests: int  # per round per target
    c64_rounds: int
    c64_seconds: float  # per round per target
    ttft_c1_streams: int  # per round per target
    ttft_c64_seconds: float
    gap_c1_streams: int
    gap_c64_streams: int  # per worker per round
    stream_rounds: int
    gap_chunks: int
    cpu_streams: int
    cpu_chunks: int
    idle_seconds: float
    many_streams: int
    many_chunks: int


FULL = Plan(
    warmup_requests=1500,
    c1_rounds=10,
    c1_requests=500,
    c64_rounds=6,
    c64_seconds=2.0,
    ttft_c1_streams=150,
    ttft_c64_seconds=1.5,
    gap_c1_streams=8,
    gap_c64_streams=2,
    stream_rounds=6,
    gap_chunks=32,
    cpu_streams=128,
    cpu_chunks=500,
    idle_seconds=2.0,
    many_streams=1000,
    many_chunks=32,
)
QUICK = Plan(
    warmup_requests=300,
    c1_rounds=4,
    c1_requests=150,
    c64_rounds=2,
    c64_seconds=1.0,
    ttft_c1_streams=50,
    ttft_c64_seconds=0.75,
    gap_c1_streams=3,
    gap_c64_streams=1,
    stream_rounds=2,
    gap_chunks=32,
    cpu_streams=64,
    cpu_chunks=200,
    idle_seconds=1.0,
    many_streams=1000,
    many_chunks=32,
)


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

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@contextlib.contextmanager
def children() -> Iterator[Callable[[str, list[str]], Child]]:
    """Starts child processes in a scratch directory and stops every one of them on the way out."""
    started: list[Child] = []
    with tempfile.TemporaryDirectory(prefix="scer-bench-") as scratch:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCER_")}

        def start(name: str, argv: list[str]) -> Child:
            log_path = Path(scratch) / f"{name}.log"
            with log_path.open("wb") as log_file:
                proc = subprocess.Popen(
                    argv,
                    cwd=scratch,
                    env=env,
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


async def wait_ready(session: aiohttp.ClientSession, child: Child, url: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise BenchError(f"{child.name} exited with {child.proc.returncode}:\n{child.log_tail()}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise BenchError(f"{child.name} did not answer {url} within {timeout_s:.0f} s:\n{child.log_tail()}")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (``/proc/PID/stat``, fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy_s() -> float:
    """CPU seconds all processes on the machine have used (``/proc/stat``: all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


class LoadWatch:
    """How many cores processes other than the benchmark's own used between two marks (noise check)."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self.noise: dict[str, float] = {}
        self._last = self._snapshot()

    def _snapshot(self) -> tuple[float, float, float]:
        ours = self_cpu_s() + sum(proc_cpu_s(pid) for pid in self.pids)
        return time.perf_counter(), machine_busy_s(), ours

    def mark(self, phase: str, report: Report) -> None:
        now = self._snapshot()
        wall = now[0] - self._last[0]
        other = max(0.0, (now[1] - self._last[1]) - (now[2] - self._last[2])) / wall if wall > 0 else 0.0
        self._last = now
        self.noise[phase] = other
        warn = "  WARNING: the machine was busy with other work; figures are disturbed" if other > 0.1 else ""
        report.line(f"(other processes used {other:.2f} cores during this phase){warn}")


def proc_memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in kB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


# ---------------------------------------------------------------------------------------------------
# Load generation.
@dataclass
class Target:
    name: str
    base_url: str
    session: aiohttp.ClientSession

    @property
    def chat_url(self) -> str:
        return self.base_url + "/v1/chat/completions"


def chat_body(
    *, stream: bool = False, max_tokens: int = 16, delay_ms: float = 0.0, include_usage: bool = False
) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        if delay_ms:
            body["chunk_delay_ms"] = delay_ms
    return orjson.dumps(body)


JSON_HEADERS = {"Content-Type": "application/json"}


async def request_once(target: Target, body: bytes) -> float | None:
    """One non-streamed request: milliseconds to the last byte, or None on any error."""
    start = time.perf_counter()
    try:
        async with target.session.post(target.chat_url, data=body, headers=JSON_HEADERS) as resp:
            await resp.read()
            if resp.status != 200:
                return None
    except (aiohttp.ClientError, TimeoutError):
        return None
    return (time.perf_counter() - start) * 1000.0


@dataclass
class StreamResult:
    ttft_ms: float
    gaps_ms: list[float]
    events: int


async def stream_once(target: Target, body: bytes, gap_events: int = 0) -> StreamResult | None:
    """One streamed request: time to the first body byte, gaps between the first ``gap_events`` events.

    None on an error status, a transport error or a stream that does not end with ``data: [DONE]``.
    """
    start = time.perf_counter()
    ttft: float | None = None
    stamps: list[float] = []
    events = 0
    tail = b""
    try:
        async with target.session.post(target.chat_url, data=body, headers=JSON_HEADERS) as resp:
            if resp.status != 200:
                await resp.read()
                return None
            async for data in resp.content.iter_any():
                now = time.perf_counter()
                if ttft is None:
                    ttft = now - start
                # Events end with a blank line; one split across two reads is counted once.
                found = data.count(b"\n\n") + (1 if tail.endswith(b"\n") and data.startswith(b"\n") else 0)
                events += found
                if found and len(stamps) < gap_events:
                    stamps.extend([now] * found)
                tail = (tail + data)[-16:]
    except (aiohttp.ClientError, TimeoutError):
        return None
    if ttft is None or not tail.endswith(b"data: [DONE]\n\n"):
        return None
    stamps = stamps[:gap_events]
    gaps = [(b - a) * 1000.0 for a, b in itertools.pairwise(stamps)]
    return StreamResult(ttft * 1000.0, gaps, events)


@dataclass
class Run:
    """Results of one closed-loop run against one target."""

    results: list[Any] = field(default_factory=list)
    errors: int = 0
    elapsed_s: float = 0.0


async def closed_loop(
    call: Callable[[], Awaitable[T | None]],
    concurrency: int,
    *,
    count: int | None = None,
    seconds: float | None = None,
) -> Run:
    """``concurrency`` workers each issue ``call`` back to back until ``count`` calls or ``seconds`` pass."""
    run = Run()
    issued = 0
    start = time.perf_counter()
    deadline = start + seconds if seconds is not None else math.inf

    async def worker() -> None:
        nonlocal issued
        while (count is None or issued < count) and time.perf_counter() < deadline:
            issued += 1
            result = await call()
            if result is None:
                run.errors += 1
            else:
                run.results.append(result)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    run.elapsed_s = time.perf_counter() - start
    return run


async def alternate(
    targets: Sequence[Target], rounds: int, one_round: Callable[[Target], Awaitable[Run]]
) -> dict[str, list[Run]]:
    """Rounds that alternate the targets' order (A B, B A, ...), so that drift touches both alike."""
    runs: dict[str, list[Run]] = {t.name: [] for t in targets}
    for i in range(rounds):
        for target in targets if i % 2 == 0 else list(reversed(targets)):
            runs[target.name].append(await one_round(target))
    return runs


def merged(runs: list[Run]) -> Run:
    out = Run()
    for run in runs:
        out.results.extend(run.results)
        out.errors += run.errors
        out.elapsed_s += run.elapsed_s
    return out


# ---------------------------------------------------------------------------------------------------
# Figures.
def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (as numpy's default); NaN for no values."""
    if not values:
        return math.nan
    data = sorted(values)
    k = (len(data) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


class Report:
    """Prints the figures as they come and keeps them for ``--json``."""

    def __init__(self) -> None:
        self.figures: dict[str, Any] = {}
        self.targets: list[tuple[str, bool]] = []

    def section(self, title: str) -> None:
        print(f"\n{title}", flush=True)

    def line(self, text: str) -> None:
        print(f"  {text}", flush=True)

    def header(self, unit: str) -> None:
        self.line(f"{'':34}{'direct':>10}{'proxy':>10}{'added':>10}   {unit}")

    def compare(
        self,
        key: str,
        label: str,
        direct: dict[str, float],
        proxy: dict[str, float],
        stat: str,
        target: float | None = None,
        note: str = "",
        other: str = "proxy",
    ) -> None:
        """One row: a percentile of direct and proxy (or ``other``), and the difference (it minus direct)."""
        d, p = direct[stat], proxy[stat]
        added = p - d
        self.figures.setdefault(key, {"direct": direct, other: proxy})
        self.figures[key].setdefault("added", {})[stat] = added
        tail = note
        if target is not None:
            ok = added <= target
            self.targets.append((f"{label} {stat} added {added:+.3f} ms <= {target} ms", ok))
            tail = f"target <= {target:g} ms  {mark(ok)}"
        self.line(f"{label + ' ' + stat:34}{d:10.3f}{p:10.3f}{added:+10.3f}   {tail}")


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": float(len(values)),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "mean": sum(values) / len(values) if values else math.nan,
    }


# ---------------------------------------------------------------------------------------------------
# The phases.
async def warm_up(targets: Sequence[Target], plan: Plan) -> None:
    plain = chat_body()
    stream = chat_body(stream=True, max_tokens=16)
    for target in targets:
        await closed_loop(partial(request_once, target, plain), 8, count=plan.warmup_requests)
        await closed_loop(partial(stream_once, target, stream), 8, count=plan.warmup_requests // 10)
        await closed_loop(partial(request_once, target, plain), 64, count=plan.warmup_requests)


async def non_streamed(
    targets: Sequence[Target],
    plan: Plan,
    report: Report,
    pids: dict[str, int],
    upstream_pid: int,
    watch: LoadWatch,
) -> None:
    """Latency at concurrency 1 and 64, and throughput at 64: direct, proxy and the bare relay in turn."""
    body = chat_body()
    report.section("1. Non-streamed latency (ms; added = proxy or relay minus direct, same percentile)")
    report.header("")
    runs = await alternate(
        targets,
        plan.c1_rounds,
        lambda t: closed_loop(lambda: request_once(t, body), 1, count=plan.c1_requests),
    )
    d, p, r = merged(runs["direct"]), merged(runs["proxy"]), merged(runs["relay"])
    report.compare(
        "nonstream_c1", "c=1", summary(d.results), summary(p.results), "p50", TARGET_C1_P50_ADDED_MS
    )
    report.compare(
        "nonstream_c1", "c=1", summary(d.results), summary(p.results), "p99", TARGET_C1_P99_ADDED_MS
    )
    for stat in ("p50", "p99"):
        report.compare(
            "nonstream_c1_relay",
            "c=1 bare relay",
            summary(d.results),
            summary(r.results),
            stat,
            note="reference: the aiohttp stack alone",
            other="relay",
        )
    b = merged(runs[PROXY_B]) if PROXY_B in runs else None
    if b is not None:
        for stat in ("p50", "p99"):
            report.compare(
                "nonstream_c1_b",
                "c=1 proxy B",
                summary(d.results),
                summary(b.results),
                stat,
                note="A/B: --b-proxy-cmd",
                other=PROXY_B,
            )
    report.line(
        f"{'c=1 requests (errors)':34}{len(d.results):>6} ({d.errors}){len(p.results):>6} ({p.errors})"
        f"   relay {len(r.results)} ({r.errors})" + (f"   B {len(b.results)} ({b.errors})" if b else "")
    )

    parts = ("client", "upstream", "middle")
    cpu: dict[str, dict[str, float]] = {t.name: dict.fromkeys(parts, 0.0) for t in targets}

    async def c64_round(target: Target) -> Run:
        middle = pids.get(target.name)
        before = (self_cpu_s(), proc_cpu_s(upstream_pid), proc_cpu_s(middle) if middle else 0.0)
        run = await closed_loop(lambda: request_once(target, body), 64, seconds=plan.c64_seconds)
        after = (self_cpu_s(), proc_cpu_s(upstream_pid), proc_cpu_s(middle) if middle else 0.0)
        for key, a, b in zip(parts, before, after, strict=True):
            cpu[target.name][key] += b - a
        return run

    runs = await alternate(targets, plan.c64_rounds, c64_round)
    d, p, r = merged(runs["direct"]), merged(runs["proxy"]), merged(runs["relay"])
    report.compare("nonstream_c64", "c=64", summary(d.results), summary(p.results), "p50")
    report.compare("nonstream_c64", "c=64", summary(d.results), summary(p.results), "p99")
    for stat in ("p50", "p99"):
        report.compare(
            "nonstream_c64_relay",
            "c=64 bare relay",
            summary(d.results),
            summary(r.results),
            stat,
            note="reference",
            other="relay",
        )
    b = merged(runs[PROXY_B]) if PROXY_B in runs else None
    if b is not None:
        for stat in ("p50", "p99"):
            report.compare(
                "nonstream_c64_b",
                "c=64 proxy B",
                summary(d.results),
                summary(b.results),
                stat,
                note="A/B",
                other=PROXY_B,
            )
    report.line(
        f"{'c=64 requests (errors)':34}{len(d.results):>6} ({d.errors}){len(p.results):>6} ({p.errors})"
        f"   relay {len(r.results)} ({r.errors})" + (f"   B {len(b.results)} ({b.errors})" if b else "")
    )

    watch.mark("nonstream", report)

    report.section("3. Throughput, non-streamed, concurrency 64 (requests/s)")
    measured = [("direct", d), ("proxy", p), ("relay", r), *([(PROXY_B, b)] if b is not None else [])]
    rps = {name: len(run.results) / run.elapsed_s for name, run in measured}
    share = rps["proxy"] / rps["direct"]
    ok = share >= TARGET_THROUGHPUT_SHARE
    report.targets.append((f"throughput at c=64 {share:.0%} of direct >= {TARGET_THROUGHPUT_SHARE:.0%}", ok))
    report.line(f"{'':34}{'direct':>10}{'proxy':>10}{'share':>10}")
    report.line(
        f"{'requests/s':34}{rps['direct']:10.0f}{rps['proxy']:10.0f}{share:10.1%}   "
        f"target >= {TARGET_THROUGHPUT_SHARE:.0%}  {mark(ok)}"
    )
    relay_share = rps["relay"] / rps["direct"]
    report.line(
        f"{'bare relay (reference)':34}{rps['direct']:10.0f}{rps['relay']:10.0f}{relay_share:10.1%}   "
        f"the proxy reaches {rps['proxy'] / rps['relay']:.0%} of the bare relay"
    )
    if b is not None:
        report.line(
            f"{'proxy B (A/B)':34}{rps['direct']:10.0f}{rps[PROXY_B]:10.0f}"
            f"{rps[PROXY_B] / rps['direct']:10.1%}   B over A: {rps[PROXY_B] / rps['proxy']:.3f}"
        )
    for name, run in measured:
        split = cpu[name]
        per_req = {k: v / max(len(run.results), 1) * 1e6 for k, v in split.items()}
        report.line(
            f"CPU per request, {name:7} (us): client {per_req['client']:6.0f}  upstream "
            f"{per_req['upstream']:6.0f}  {'relay' if name == 'relay' else 'proxy'} {per_req['middle']:6.0f}  "
            f"(CPU busy {sum(split.values()) / run.elapsed_s:.2f} of {os.cpu_count()} cores)"
        )
    report.figures["throughput_c64"] = {
        "direct_rps": rps["direct"],
        "proxy_rps": rps["proxy"],
        "relay_rps": rps["relay"],
        "share": share,
        "relay_share": relay_share,
        "cpu_s": cpu,
        "elapsed_s": {name: run.elapsed_s for name, run in measured},
    }
    if b is not None:
        report.figures["throughput_c64"]["proxy_b_rps"] = rps[PROXY_B]


async def streamed(targets: Sequence[Target], plan: Plan, report: Report, watch: LoadWatch) -> None:
    report.section(
        f"2. Streamed (client did not ask for usage; ms). TTFT: {16} chunks, no delay; "
        f"gap: {plan.gap_chunks} chunks, {GAP_DELAY_MS:g} ms apart"
    )
    report.header("")
    fast = chat_body(stream=True, max_tokens=16)
    slow = chat_body(stream=True, max_tokens=plan.gap_chunks, delay_ms=GAP_DELAY_MS)
    for concurrency in (1, 64):
        if concurrency == 1:
            ttft_runs = await alternate(
                targets,
                plan.stream_rounds,
                lambda t: closed_loop(lambda: stream_once(t, fast), 1, count=plan.ttft_c1_streams),
            )
            gap_count = plan.gap_c1_streams
        else:
            ttft_runs = await alternate(
                targets,
                plan.stream_rounds,
                lambda t: closed_loop(lambda: stream_once(t, fast), 64, seconds=plan.ttft_c64_seconds),
            )
            gap_count = plan.gap_c64_streams * 64
        gap_runs = await alternate(
            targets,
            plan.stream_rounds,
            partial(
                _gap_round, body=slow, gap_events=plan.gap_chunks, concurrency=concurrency, count=gap_count
            ),
        )
        ttft = {name: merged(runs) for name, runs in ttft_runs.items()}
        gaps = {name: merged(runs) for name, runs in gap_runs.items()}
        ttft_s = {name: summary([r.ttft_ms for r in run.results]) for name, run in ttft.items()}
        gap_s = {name: summary([g for r in run.results for g in r.gaps_ms]) for name, run in gaps.items()}
        for stat in ("p50", "p99"):
            report.compare(
                f"stream_ttft_c{concurrency}",
                f"c={concurrency} TTFT",
                ttft_s["direct"],
                ttft_s["proxy"],
                stat,
            )
        for stat in ("p50", "p99"):
            report.compare(
                f"stream_gap_c{concurrency}",
                f"c={concurrency} chunk gap",
                gap_s["direct"],
                gap_s["proxy"],
                stat,
            )
        errors = {name: ttft[name].errors + gaps[name].errors for name in ttft}
        report.line(
            f"{f'c={concurrency} streams (errors)':34}"
            f"{len(ttft['direct'].results) + len(gaps['direct'].results):>6} ({errors['direct']})"
            f"{len(ttft['proxy'].results) + len(gaps['proxy'].results):>6} ({errors['proxy']})"
        )
    watch.mark("streamed", report)


async def _gap_round(target: Target, *, body: bytes, gap_events: int, concurrency: int, count: int) -> Run:
    return await closed_loop(partial(stream_once, target, body, gap_events), concurrency, count=count)


async def stream_cpu(
    targets: Sequence[Target], plan: Plan, report: Report, proxy_pid: int, watch: LoadWatch
) -> None:
    report.section(
        f"4. Proxy CPU per streamed chunk ({plan.cpu_streams} streams x {plan.cpu_chunks} chunks, "
        "64 at a time, no delay)"
    )
    idle_before = proc_cpu_s(proxy_pid)
    await asyncio.sleep(plan.idle_seconds)
    idle_rate = (proc_cpu_s(proxy_pid) - idle_before) / plan.idle_seconds
    report.line(f"proxy idle CPU (meter polling): {idle_rate * 1000:.1f} ms per second")
    proxy = next(t for t in targets if t.name == "proxy")
    direct = next(t for t in targets if t.name == "direct")
    # The upstream sends a usage chunk either way: asked by the client, or asked by the proxy for it.
    upstream_events = plan.cpu_chunks + 3
    figures: dict[str, Any] = {"idle_cpu_s_per_s": idle_rate}
    for label, asked in (("client asked usage", True), ("proxy injected usage", False)):
        body = chat_body(stream=True, max_tokens=plan.cpu_chunks, include_usage=asked)
        direct_run = await closed_loop(partial(stream_once, direct, body), 64, count=plan.cpu_streams)
        cpu_before = proc_cpu_s(proxy_pid)
        run = await closed_loop(partial(stream_once, proxy, body), 64, count=plan.cpu_streams)
        cpu = proc_cpu_s(proxy_pid) - cpu_before - idle_rate * run.elapsed_s
        chunks = len(run.results) * upstream_events
        per_chunk_us = cpu / chunks * 1e6 if chunks else math.nan
        per_cpu_s = chunks / cpu if cpu > 0 else math.inf
        wall_direct = len(direct_run.results) * upstream_events / direct_run.elapsed_s
        wall_proxy = chunks / run.elapsed_s
        report.line(
            f"{label:22}: {per_chunk_us:6.1f} us CPU/chunk = {per_cpu_s:8.0f} chunks per proxy CPU-second "
            f"({cpu:.2f} s CPU, {chunks} chunks, errors {run.errors}); client sees {wall_direct:6.0f} "
            f"chunks/s direct, {wall_proxy:6.0f} via proxy"
        )
        figures["usage_asked" if asked else "usage_injected"] = {
            "cpu_s": cpu,
            "chunks": chunks,
            "us_per_chunk": per_chunk_us,
            "chunks_per_cpu_s": per_cpu_s,
            "errors": run.errors + direct_run.errors,
            "wall_chunks_per_s": {"direct": wall_direct, "proxy": wall_proxy},
        }
    report.line("reference (DESIGN.md): bare line-by-line relay ~24 us/chunk (42,000/s); goal >= 80,000/s")
    watch.mark("stream_cpu", report)
    report.figures["stream_cpu"] = figures


async def many_streams(targets: Sequence[Target], plan: Plan, report: Report, watch: LoadWatch) -> None:
    report.section(
        f"6. {plan.many_streams} concurrent streams ({plan.many_chunks} chunks each, "
        f"{GAP_DELAY_MS:g} ms apart)"
    )
    body = chat_body(stream=True, max_tokens=plan.many_chunks, delay_ms=GAP_DELAY_MS)
    figures: dict[str, Any] = {}
    for target in targets:
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_once(target, body) for _ in range(plan.many_streams)))
        elapsed = time.perf_counter() - start
        errors = sum(1 for r in results if r is None or r.events < plan.many_chunks + 2)
        ttfts = [r.ttft_ms for r in results if r is not None]
        figures[target.name] = {
            "errors": errors,
            "seconds": elapsed,
            "ttft_p50_ms": percentile(ttfts, 50),
            "ttft_p99_ms": percentile(ttfts, 99),
        }
        tail = ""
        if target.name == "proxy":
            ok = errors == 0
            report.targets.append(
                (f"{plan.many_streams} concurrent streams through the proxy: {errors} errors", ok)
            )
            tail = f"   target 0 errors  {mark(ok)}"
        report.line(
            f"{target.name:7} errors {errors:4}   total {elapsed:6.2f} s   TTFT p50 {percentile(ttfts, 50):7.1f}"
            f" ms  p99 {percentile(ttfts, 99):7.1f} ms{tail}"
        )
    report.figures["many_streams"] = figures
    watch.mark("many_streams", report)


def memory(report: Report, before: dict[str, int], after: dict[str, int]) -> None:
    report.section("5. Proxy memory (MiB)")
    report.line(
        f"RSS after start-up {before['VmRSS'] / 1024:.1f}   RSS at the end {after['VmRSS'] / 1024:.1f}   "
        f"peak (VmHWM) {after['VmHWM'] / 1024:.1f}"
    )
    report.figures["memory_kb"] = {
        "rss_before": before["VmRSS"],
        "rss_after": after["VmRSS"],
        "peak_hwm": after["VmHWM"],
    }


# ---------------------------------------------------------------------------------------------------
def serve_args(upstream_url: str, proxy_url: str) -> list[str]:
    """The ``scer-proxy`` arguments of a proxy under test (after its command)."""
    return [
        "serve",
        "--upstream",
        upstream_url,
        "--meter",
        "simulated",
        "--listen",
        proxy_url.removeprefix("http://"),
        "--log-level",
        "warning",
    ]


def _session(limit: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit, keepalive_timeout=120)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=120), cookie_jar=aiohttp.DummyCookieJar()
    )


async def run_bench(plan: Plan, args: argparse.Namespace) -> Report:
    report = Report()
    up_port = args.upstream_port or free_port()
    px_port = args.proxy_port or free_port()
    rl_port = free_port()
    up_url, px_url, rl_url = (f"http://127.0.0.1:{port}" for port in (up_port, px_port, rl_port))
    limit = max(plan.many_streams, 64) + 16
    with children() as start:
        upstream = start("upstream", [sys.executable, str(UPSTREAM_SCRIPT), str(up_port)])
        relay = start("relay", [sys.executable, str(RELAY_SCRIPT), str(rl_port), up_url])
        async with (
            _session(limit) as direct_session,
            _session(limit) as proxy_session,
            _session(limit) as relay_session,
            _session(limit) as b_session,
        ):
            await wait_ready(direct_session, upstream, up_url + "/health")
            await wait_ready(relay_session, relay, rl_url + "/health")
            prefix = shlex.split(args.proxy_cmd) if args.proxy_cmd else [sys.executable, "-m", "scer_proxy"]
            proxy = start("proxy", [*prefix, *serve_args(up_url, px_url)])
            await wait_ready(proxy_session, proxy, px_url + "/scer/health")
            mem_before = proc_memory_kb(proxy.pid)
            targets = [Target("direct", up_url, direct_session), Target("proxy", px_url, proxy_session)]
            references = [Target("relay", rl_url, relay_session)]
            pids = {"proxy": proxy.pid, "relay": relay.pid}
            if args.b_proxy_cmd:
                b_url = f"http://127.0.0.1:{free_port()}"
                proxy_b = start(PROXY_B, [*shlex.split(args.b_proxy_cmd), *serve_args(up_url, b_url)])
                await wait_ready(b_session, proxy_b, b_url + "/scer/health")
                references.append(Target(PROXY_B, b_url, b_session))
                pids[PROXY_B] = proxy_b.pid
            print(
                f"scer-proxy overhead benchmark ({'quick' if args.quick else 'full'}): upstream pid {upstream.pid} "
                f"{up_url}, proxy pid {proxy.pid} {px_url}, bare relay pid {relay.pid} {rl_url}, "
                f"{os.cpu_count()} CPUs, Python "
                f"{sys.version.split()[0]}, aiohttp {aiohttp.__version__}, uvloop {version('uvloop')}",
                flush=True,
            )
            started = time.perf_counter()
            await warm_up([*targets, *references], plan)
            watch = LoadWatch([upstream.pid, *pids.values()])
            await non_streamed([*targets, *references], plan, report, pids, upstream.pid, watch)
            await streamed(targets, plan, report, watch)
            await stream_cpu(targets, plan, report, proxy.pid, watch)
            await many_streams(targets, plan, report, watch)
            memory(report, mem_before, proc_memory_kb(proxy.pid))
            if proxy.proc.poll() is not None:
                raise BenchError(f"the proxy exited during the run:\n{proxy.log_tail()}")
            report.figures["run"] = {
                "quick": args.quick,
                "seconds": time.perf_counter() - started,
                "cpus": os.cpu_count(),
                "python": sys.version.split()[0],
                "aiohttp": aiohttp.__version__,
                "other_load_cores": watch.noise,
            }
    report.section("Targets")
    for text, ok in report.targets:
        report.line(f"{mark(ok)}  {text}")
    report.figures["targets"] = [{"target": text, "pass": ok} for text, ok in report.targets]
    print(f"\n(run took {report.figures['run']['seconds']:.0f} s)")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description="Proxy overhead against direct calls to a fast upstream.")
    parser.add_argument("--quick", action="store_true", help="fewer requests: a smoke run of about 30 s")
    parser.add_argument("--json", metavar="FILE", type=Path, help="also write the figures as JSON")
    parser.add_argument(
        "--upstream-port", type=int, default=0, help="port of the fast upstream (default: free)"
    )
    parser.add_argument("--proxy-port", type=int, default=0, help="port of the proxy (default: free)")
    parser.add_argument(
        "--proxy-cmd",
        default="",
        help="command that stands for 'scer-proxy' (A/B runs of a "
        "patched proxy); default: this Python with -m scer_proxy",
    )
    parser.add_argument(
        "--b-proxy-cmd",
        default="",
        help="a second 'scer-proxy' command, run beside the first "
        "as 'proxy B' in the non-streamed phases: A and B measured side by side in one run",
    )
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the child processes are stopped on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        report = uvloop.run(run_bench(QUICK if args.quick else FULL, args))
    except BenchError as exc:
        print(f"benchmark setup failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.json:
        args.json.write_text(json.dumps(report.figures, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
