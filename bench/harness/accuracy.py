"""Accuracy of the proxy's per-request energy against the simulator's ground truth.

The simulator and the proxy run as they are deployed, each in its own process (``scer-proxy
simulate`` and ``scer-proxy serve`` on loopback ports), so that neither waits on the other's event
loop nor on the client's; a workload is driven through the proxy with the official openai client,
and each request's figures are compared with the simulator's truth: the header figure (settled part
plus estimated tail, at response time) and the settled ledger figure. The proxy sees only HTTP and
the DCGM-style counter; everything the harness reads comes over HTTP too.

A workload's plan (``bench.harness.replay.Workload.plan``) is followed as the replay follows it:
open-loop requests are sent at their arrival time (simulated seconds from the run's start, over the
time scale in wall time), closed-loop ones by ``concurrency`` clients in turn; a stream planned to be
cancelled is read for that many content chunks and then closed (the client goes away: the proxy
records it as ``cancelled``, the simulator cancels the sequence and keeps its truth). Requests of one
output token, not streamed ("embeddings-shaped") are chat completions with ``max_tokens`` 1: the
simulator has no embeddings endpoint. ``run_scenario_http`` runs a scenario of
``bench.harness.scenarios``: one simulator per profile behind one proxy, routed by model.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

from bench.harness.matrix import number
from bench.harness.replay import Planned, Workload, percentile, relative_errors
from bench.harness.scenarios import REPORT_SEED, Scenario
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
    settled_unc: float | None = None  # the record's stated relative uncertainty (energy_uncertainty_rel)
    header_unc: float | None = None  # the response's: X-SCER-Energy-Uncertainty, or the stream's usage.scer
    idle_j: float = 0.0  # the amortized idle share included in the settled figure (energy_idle_j)
    profile: str = ""
    upstream: str = ""  # the proxy upstream the request was sent to (its simulator)
    cancel_after: int | None = None  # the planned disconnect (content chunks read), None: read to the end
    truth: dict[str, Any] = field(default_factory=dict)  # the simulator's /sim/truth record


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
    scenario: str = ""
    time_scale: float = 1.0

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


@dataclass(frozen=True)
class _Upstream:
    """One simulator behind the proxy: the proxy's upstream name, the profile, its URL once started."""

    name: str
    profile: str
    url: str = ""


def _proxy_config(
    upstreams: Sequence[_Upstream], *, idle: str, interval_ms: float, prefill_weight: float | str
) -> str:
    weight = f'"{prefill_weight}"' if isinstance(prefill_weight, str) else repr(float(prefill_weight))
    config = (
        f'[meter]\nkind = "simulated"\ninterval_ms = {interval_ms!r}\n'
        f'[storage]\npath = ":memory:"\n'
        f'[attribution]\nidle = "{idle}"\nprefill_weight = {weight}\n'
        f'[server]\nlog_level = "warning"\n'
    )
    for u in upstreams:
        profile = get_profile(u.profile)
        config += (
            f'[[upstreams]]\nname = "{u.name}"\nurl = "{u.url}"\nmodels = ["{profile.model_id}"]\n'
            f"gpus = {list(range(profile.num_gpus))}\n"
        )
    return config


@contextlib.asynccontextmanager
async def _stack(
    upstreams: Sequence[_Upstream],
    *,
    idle: str,
    time_scale: float,
    metrics_period_ms: float,
    prefill_weight: float | str,
) -> AsyncIterator[tuple[list[_Upstream], str]]:
    """A simulator per upstream and one proxy in front of them (routed by model), each in its own
    process; yields the upstreams with their URLs, and the proxy's URL."""
    started = [dataclasses.replace(u, url=f"http://127.0.0.1:{free_port()}") for u in upstreams]
    proxy_url = f"http://127.0.0.1:{free_port()}"
    # The proxy samples faster than the counter updates (in wall time: the period over the time scale).
    interval_ms = max(10.0, metrics_period_ms / time_scale / 4)
    with tempfile.TemporaryDirectory(prefix="scer-accuracy-") as tmp:
        config = _proxy_config(started, idle=idle, interval_ms=interval_ms, prefill_weight=prefill_weight)
        (Path(tmp) / "proxy.toml").write_text(config)
        async with contextlib.AsyncExitStack() as stack:
            spawned = await asyncio.gather(
                *(
                    _spawn(
                        [
                            "simulate",
                            "--listen",
                            u.url.removeprefix("http://"),
                            "--profile",
                            u.profile,
                            "--time-scale",
                            repr(time_scale),
                            "--metrics-period-ms",
                            repr(metrics_period_ms),
                        ],
                        Path(tmp) / f"sim-{i}.log",
                        f"{u.url}/health",
                    )
                    for i, u in enumerate(started)
                ),
                return_exceptions=True,
            )
            for proc in spawned:
                if isinstance(proc, asyncio.subprocess.Process):
                    stack.push_async_callback(stop_process, proc)
            for proc in spawned:
                if isinstance(proc, BaseException):
                    raise proc
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
            stack.push_async_callback(stop_process, proxy)
            yield started, proxy_url


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
        [_Upstream("sim", profile_name)],
        idle=idle,
        time_scale=time_scale,
        metrics_period_ms=metrics_period_ms,
        prefill_weight=prefill_weight,
    ) as (upstreams, proxy_url):
        report = AccuracyReport(profile=profile_name, idle=idle, time_scale=time_scale)
        return await _drive(report, [(upstreams[0], workload)], proxy_url, time_scale, progress)


async def run_scenario_http(
    scenario: Scenario,
    seed: int = REPORT_SEED,
    *,
    time_scale: float = 1.0,
    prefill_weight: float | str = "auto",
    progress: Any = None,
) -> AccuracyReport:
    """``scenario`` over HTTP: a simulator per profile (its counter updating every
    ``scenario.metrics_period_s``) behind one proxy with an upstream per simulator, routed by model, under
    the scenario's idle policy; each profile's workload (``scenario.workload_for(profile, seed)``) is
    driven at the same time, and the results are pooled."""
    async with _stack(
        [_Upstream(profile, profile) for profile in scenario.profiles],
        idle=scenario.idle,
        time_scale=time_scale,
        metrics_period_ms=scenario.metrics_period_s * 1000.0,
        prefill_weight=prefill_weight,
    ) as (upstreams, proxy_url):
        report = AccuracyReport(
            profile=",".join(scenario.profiles),
            idle=scenario.idle,
            scenario=scenario.name,
            time_scale=time_scale,
        )
        jobs = [(u, scenario.workload_for(u.profile, seed)) for u in upstreams]
        return await _drive(report, jobs, proxy_url, time_scale, progress)


@dataclass
class _Sent:
    """What the client saw of one request."""

    upstream: _Upstream
    planned: Planned
    request_id: str
    completion_id: str
    header_j: float | None
    header_unc: float | None


async def _send(client: openai.AsyncOpenAI, upstream: _Upstream, planned: Planned, prompt_seed: int) -> _Sent:
    """One planned request through the proxy; a stream with ``cancel_after`` is closed after that many
    chunks carrying content."""
    model = get_profile(upstream.profile).model_id
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": prompt_text(random.Random(prompt_seed), planned.prompt_tokens)}
    ]
    extra = {"ignore_eos": True}
    header_j = header_unc = None
    if planned.stream:
        async with client.chat.completions.with_streaming_response.create(
            model=model,
            messages=messages,
            max_tokens=planned.output_tokens,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        ) as resp:
            rid = resp.headers["x-scer-request-id"]
            completion_id = ""
            content = 0
            async for chunk in await resp.parse():
                completion_id = completion_id or chunk.id
                if chunk.choices and chunk.choices[0].delta.content:
                    content += 1
                if chunk.usage is not None:
                    scer = (chunk.usage.model_extra or {}).get("scer") or {}
                    header_j = number(scer.get("energy_j"))
                    header_unc = number(scer.get("energy_uncertainty_rel"))
                if planned.cancel_after is not None and content >= planned.cancel_after:
                    break  # the client goes away: leaving the block closes the response
    else:
        # Embeddings-shaped requests (one output token, not streamed) are chat completions too.
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=planned.output_tokens, extra_body=extra
        )
        rid = raw.headers["x-scer-request-id"]
        completion_id = raw.parse().id
        header_j = number(raw.headers.get("x-scer-energy-j"))
        header_unc = number(raw.headers.get("x-scer-energy-uncertainty"))
    return _Sent(upstream, planned, rid, completion_id, header_j, header_unc)


async def _run_workload(
    client: openai.AsyncOpenAI,
    upstream: _Upstream,
    workload: Workload,
    *,
    started: float,
    time_scale: float,
    seed_base: int,
    sent: list[_Sent],
    progress: Any,
) -> None:
    """Follow ``workload``'s plan: open loop at each arrival time, else ``concurrency`` clients each
    sending the next request ``idle_gap_s`` after its last one ended (times in simulated seconds)."""
    loop = asyncio.get_running_loop()
    plan = workload.plan()

    async def one(i: int) -> None:
        sent.append(await _send(client, upstream, plan[i], seed_base + i))
        if progress is not None:
            progress.update(1)

    async def at(i: int) -> None:
        await asyncio.sleep(max(0.0, started + (plan[i].at_s or 0.0) / time_scale - loop.time()))
        await one(i)

    if workload.open_loop:
        await asyncio.gather(*(at(i) for i in range(len(plan))))
        return
    order = iter(range(len(plan)))

    async def client_loop() -> None:
        await asyncio.sleep(max(0.0, started + workload.start_s / time_scale - loop.time()))
        for i in order:  # shared: each client takes the next request when it is free
            await one(i)
            if workload.idle_gap_s > 0:
                await asyncio.sleep(workload.idle_gap_s / time_scale)

    await asyncio.gather(*(client_loop() for _ in range(workload.concurrency)))


async def _drive(
    report: AccuracyReport,
    jobs: Sequence[tuple[_Upstream, Workload]],
    proxy_url: str,
    time_scale: float,
    progress: Any,
) -> AccuracyReport:
    """Drive each upstream's workload at once, wait until the proxy settled every record, and compare
    each request's figures with its simulator's truth."""
    client = openai.AsyncOpenAI(base_url=f"{proxy_url}/v1", api_key="sk-accuracy", max_retries=0, timeout=600)
    sent: list[_Sent] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        await asyncio.gather(
            *(
                _run_workload(
                    client,
                    upstream,
                    workload,
                    started=started,
                    time_scale=time_scale,
                    seed_base=k * 1_000_000,
                    sent=sent,
                    progress=progress,
                )
                for k, (upstream, workload) in enumerate(jobs)
            )
        )
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
                meters = health["meter"]["upstreams"]
                split = not (
                    any(m["pending_requests"] or m["deferred_intervals"] for m in meters)
                    or health["ledger"]["pending_settlement"]
                )
                if split and all(records.get(s.request_id, {}).get("settled") for s in sent):
                    break
                if loop.time() > deadline:
                    break
                await asyncio.sleep(0.02)
            for s in sent:
                reply = await http.get(f"{s.upstream.url}/sim/truth/{s.completion_id}")
                truth = reply.json() if reply.status_code == 200 else {}
                record = records.get(s.request_id, {})
                settled = bool(record.get("settled"))
                report.results.append(
                    RequestResult(
                        request_id=s.request_id,
                        completion_id=s.completion_id,
                        stream=s.planned.stream,
                        prompt_tokens=truth.get("prompt_tokens", 0),
                        completion_tokens=truth.get("completion_tokens", 0),
                        true_j=truth.get("energy_j", math.nan),
                        header_j=s.header_j,
                        settled_j=record.get("energy_j") if settled else None,
                        record=record,
                        settled_unc=number(record.get("energy_uncertainty_rel")) if settled else None,
                        header_unc=s.header_unc,
                        idle_j=record.get("energy_idle_j") or 0.0,
                        profile=s.upstream.profile,
                        upstream=s.upstream.name,
                        cancel_after=s.planned.cancel_after,
                        truth=truth,
                    )
                )
            summary = (await http.get(f"{proxy_url}/scer/summary")).json()
            after = (await http.get(f"{proxy_url}/scer/health")).json()["meter"]["upstreams"]
        report.measured_j = sum(m["measured_j"] for m in meters)
        report.measured_after_j = sum(m["measured_j"] for m in after)
        report.counter_j = sum(m["counter_j"] or 0.0 for m in meters)
        report.idle_j = summary["idle_energy_j"]
        report.attributed_j = summary["totals"]["energy_j"] or 0.0
    finally:
        await client.close()
    return report
