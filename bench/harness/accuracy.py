"""Accuracy of the proxy's per-request energy against the simulator's ground truth.

The simulator and the proxy run as they are deployed, each in its own process (``scer-proxy
simulate`` and ``scer-proxy serve`` on loopback ports), so that neither waits on the other's event
loop nor on the client's; a workload is driven through the proxy with the official openai client,
and each request's figures are compared with the simulator's truth: the header figure (settled part
plus estimated tail, at response time) and the settled ledger figure. The proxy sees only HTTP and
the DCGM-style counter; everything the harness reads comes over HTTP too.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

from bench.harness.replay import Workload, percentile, relative_errors
from scer_proxy.proxy.serving import free_port
from scer_proxy.sim.profiles import get_profile

WORDS = ("river", "stone", "cloud", "field", "light", "water", "north", "green", "grain", "tide")


@dataclass
class RequestResult:
    request_id: str
    completion_id: str
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    true_j: float
    header_j: float | None
    settled_j: float | None
    record: dict[str, Any] = field(default_factory=dict)  # the proxy's ledger record ({} when missing)


@dataclass
class AccuracyReport:
    profile: str
    idle: str
    results: list[RequestResult] = field(default_factory=list)
    counter_j: float = 0.0
    attributed_j: float = 0.0
    idle_j: float = 0.0
    measured_j: float = 0.0  # the proxy's measured energy once everything was split (read before the summary)
    measured_after_j: float = 0.0  # ... and read again after it (idle keeps accruing in between)
    wall_s: float = 0.0

    def errors(self, which: str) -> list[float]:
        """Relative errors |proxy - truth| / truth of the header or settled figure, per request."""
        return relative_errors(self.results, which)

    def conservation_rel(self) -> float | None:
        """How far attributed + idle lies outside [measured before, measured after] the summary was read,
        relative to the measured energy: 0 when nothing was lost or invented."""
        if not self.measured_j:
            return None
        total = self.attributed_j + self.idle_j
        high = max(self.measured_j, self.measured_after_j)
        return max(self.measured_j - total, total - high, 0.0) / self.measured_j

    def summary(self) -> dict[str, Any]:
        pct = percentile
        settled, header = self.errors("settled"), self.errors("header")
        return {
            "profile": self.profile,
            "idle": self.idle,
            "requests": len(self.results),
            "settled_median": pct(settled, 0.5),
            "settled_p95": pct(settled, 0.95),
            "settled_max": max(settled, default=None),
            "header_median": pct(header, 0.5),
            "header_p95": pct(header, 0.95),
            "conservation_rel": self.conservation_rel(),
            "measured_vs_counter_rel": (
                abs(self.measured_j - self.counter_j) / self.counter_j if self.counter_j else None
            ),
            "wall_s": self.wall_s,
        }


def prompt_text(rng: random.Random, tokens: int) -> str:
    """Random words, ``tokens`` cl100k tokens long: each word with its leading space is one token (the
    chat framing adds a few more)."""
    return "".join(" " + rng.choice(WORDS) for _ in range(max(1, tokens)))


async def _spawn(
    args: list[str], log: Path, ready_url: str, timeout_s: float = 30.0
) -> asyncio.subprocess.Process:
    """Start ``python -m scer_proxy ARGS`` and wait until ``ready_url`` answers."""
    return await spawn_python(["-m", "scer_proxy", *args], log, ready_url, timeout_s)


async def spawn_python(
    argv: list[str], log: Path, ready_url: str, timeout_s: float = 30.0
) -> asyncio.subprocess.Process:
    """Start this Python with ``argv`` and wait until ``ready_url`` answers (below 500)."""
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out
        )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with httpx.AsyncClient(timeout=1.0) as http:
        while loop.time() < deadline:
            if proc.returncode is not None:
                break
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(ready_url)).status_code < 500:
                    return proc
            await asyncio.sleep(0.05)
    await stop_process(proc)
    output = await asyncio.to_thread(log.read_text, errors="replace")
    raise RuntimeError(f"{' '.join(argv[:3])} did not start: {output[-2000:]}")


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after 30 s; returns once the process has exited."""
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def _stack(
    profile_name: str, *, idle: str, time_scale: float, metrics_period_ms: float, prefill_weight: float | str
) -> AsyncIterator[tuple[str, str]]:
    """The simulator and a proxy in front of it, each in its own process; yields their URLs."""
    profile = get_profile(profile_name)
    sim_url, proxy_url = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    # The proxy samples faster than the counter updates (in wall time: the period over the time scale).
    interval_ms = max(10.0, metrics_period_ms / time_scale / 4)
    weight = f'"{prefill_weight}"' if isinstance(prefill_weight, str) else repr(float(prefill_weight))
    config = (
        f'[meter]\nkind = "simulated"\ninterval_ms = {interval_ms!r}\n'
        f'[storage]\npath = ":memory:"\n'
        f'[attribution]\nidle = "{idle}"\nprefill_weight = {weight}\n'
        f'[server]\nlog_level = "warning"\n'
        f'[[upstreams]]\nname = "sim"\nurl = "{sim_url}"\ngpus = {list(range(profile.num_gpus))}\n'
    )
    with tempfile.TemporaryDirectory(prefix="scer-accuracy-") as tmp:
        (Path(tmp) / "proxy.toml").write_text(config)
        sim = await _spawn(
            [
                "simulate",
                "--listen",
                sim_url.removeprefix("http://"),
                "--profile",
                profile_name,
                "--time-scale",
                repr(time_scale),
                "--metrics-period-ms",
                repr(metrics_period_ms),
            ],
            Path(tmp) / "sim.log",
            f"{sim_url}/health",
        )
        try:
            proxy = await _spawn(
                [
                    "serve",
                    "--config",
                    str(Path(tmp) / "proxy.toml"),
                    "--listen",
                    proxy_url.removeprefix("http://"),
                ],
                Path(tmp) / "proxy.log",
                f"{proxy_url}/scer/health",
            )
            try:
                yield sim_url, proxy_url
            finally:
                await stop_process(proxy)
        finally:
            await stop_process(sim)


async def run_accuracy(
    profile_name: str = "llama-3.1-8b-h100",
    *,
    idle: str = "separate",
    workload: Workload | None = None,
    time_scale: float = 1.0,
    metrics_period_ms: float = 100.0,
    prefill_weight: float | str = "auto",
    progress: Any = None,
) -> AccuracyReport:
    """Drive ``workload`` through a proxy in front of a simulator and compare with the truth.

    At ``time_scale`` 1 (real time) a decode step lasts several milliseconds, well above the event loop's
    jitter on a busy 2-core machine; faster runs are fine on an idle one.
    """
    workload = workload if workload is not None else Workload()
    async with _stack(
        profile_name,
        idle=idle,
        time_scale=time_scale,
        metrics_period_ms=metrics_period_ms,
        prefill_weight=prefill_weight,
    ) as (sim_url, proxy_url):
        return await _drive(profile_name, workload, sim_url, proxy_url, idle, progress)


async def _drive(
    profile_name: str, workload: Workload, sim_url: str, proxy_url: str, idle: str, progress: Any
) -> AccuracyReport:
    profile = get_profile(profile_name)
    report = AccuracyReport(profile=profile_name, idle=idle)
    plan = workload.plan()
    client = openai.AsyncOpenAI(base_url=f"{proxy_url}/v1", api_key="sk-accuracy", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(workload.concurrency)
    pending: list[tuple[str, str, bool, float | None]] = []
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def one(i: int, prompt_tokens: int, output_tokens: int, stream: bool) -> None:
        messages: list[ChatCompletionMessageParam] = [
            {"role": "user", "content": prompt_text(random.Random(i), prompt_tokens)}
        ]
        async with gate:
            extra = {"ignore_eos": True}
            if stream:
                async with client.chat.completions.with_streaming_response.create(
                    model=profile.model_id,
                    messages=messages,
                    max_tokens=output_tokens,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body=extra,
                ) as resp:
                    rid = resp.headers["x-scer-request-id"]
                    completion_id = ""
                    header_j = None
                    async for chunk in await resp.parse():
                        completion_id = chunk.id
                        if chunk.usage is not None:
                            scer = (chunk.usage.model_extra or {}).get("scer", {})
                            header_j = scer.get("energy_j")
            else:
                raw = await client.chat.completions.with_raw_response.create(
                    model=profile.model_id,
                    messages=messages,
                    max_tokens=output_tokens,
                    extra_body=extra,
                )
                rid = raw.headers["x-scer-request-id"]
                completion_id = raw.parse().id
                header_j = float(raw.headers["x-scer-energy-j"]) if "x-scer-energy-j" in raw.headers else None
        pending.append((rid, completion_id, stream, header_j))
        if progress is not None:
            progress.update(1)

    try:
        await asyncio.gather(*(one(i, p, o, s) for i, (p, o, s) in enumerate(plan)))
        report.wall_s = loop.time() - started
        async with httpx.AsyncClient(timeout=30) as http:
            # Let the counter publish past the last request's end, then wait until every record settled
            # and every measured interval is split (a deadline in wall time: a busy machine is slower).
            deadline = loop.time() + 60.0
            while True:
                records = {
                    r["request_id"]: r
                    for r in (await http.get(f"{proxy_url}/scer/requests?limit=10000")).json()["data"]
                }
                health = (await http.get(f"{proxy_url}/scer/health")).json()
                meter = health["meter"]["upstreams"][0]
                split = not (
                    meter["pending_requests"]
                    or meter["deferred_intervals"]
                    or health["ledger"]["pending_settlement"]
                )
                if split and all(records.get(rid, {}).get("settled") for rid, *_ in pending):
                    break
                if loop.time() > deadline:
                    break
                await asyncio.sleep(0.02)
            for rid, completion_id, stream, header_j in pending:
                truth = (await http.get(f"{sim_url}/sim/truth/{completion_id}")).json()
                record = records.get(rid, {})
                report.results.append(
                    RequestResult(
                        request_id=rid,
                        completion_id=completion_id,
                        stream=stream,
                        prompt_tokens=truth["prompt_tokens"],
                        completion_tokens=truth["completion_tokens"],
                        true_j=truth["energy_j"],
                        header_j=header_j,
                        settled_j=record.get("energy_j") if record.get("settled") else None,
                        record=record,
                    )
                )
            summary = (await http.get(f"{proxy_url}/scer/summary")).json()
            after = (await http.get(f"{proxy_url}/scer/health")).json()["meter"]["upstreams"][0]
        report.measured_j = meter["measured_j"]
        report.measured_after_j = after["measured_j"]
        report.counter_j = meter["counter_j"] or 0.0
        report.idle_j = summary["idle_energy_j"]
        report.attributed_j = summary["totals"]["energy_j"] or 0.0
    finally:
        await client.close()
    return report
