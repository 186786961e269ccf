"""Accuracy of the proxy's per-request energy against the simulator's ground truth.

The simulator and the proxy run in one event loop (each a real HTTP server on a loopback port); a
workload is driven through the proxy with the official openai client, and each request's figures are
compared with the simulator's truth: the header figure (settled part plus estimated tail, at response
time) and the settled ledger figure. The proxy sees only HTTP and the DCGM-style counter.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
from openai.types.chat import ChatCompletionMessageParam

from scer_proxy.app import create_app
from scer_proxy.config import UpstreamConfig, load_config
from scer_proxy.serving import serve_app
from scer_proxy.sim.profiles import get_profile
from scer_proxy.sim.replay import Workload, percentile
from scer_proxy.sim.server import create_sim_app
from scer_proxy.web.keys import METERS

WORDS = ("river", "stone", "cloud", "field", "light", "water", "north", "green", "grain", "tide")


@dataclass
class RequestResult:
    request_id: str
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    true_j: float
    header_j: float | None
    settled_j: float | None


@dataclass
class AccuracyReport:
    profile: str
    idle: str
    results: list[RequestResult] = field(default_factory=list)
    counter_j: float = 0.0
    attributed_j: float = 0.0
    idle_j: float = 0.0
    measured_j: float = 0.0
    wall_s: float = 0.0

    def errors(self, which: str) -> list[float]:
        """Relative errors |proxy - truth| / truth of the header or settled figure, per request."""
        out = []
        for r in self.results:
            value = r.header_j if which == "header" else r.settled_j
            if value is not None and r.true_j > 0:
                out.append(abs(value - r.true_j) / r.true_j)
        return out

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
            "conservation_rel": (abs(self.attributed_j + self.idle_j - self.measured_j) / self.measured_j
                                 if self.measured_j else None),
            "measured_vs_counter_rel": (abs(self.measured_j - self.counter_j) / self.counter_j
                                        if self.counter_j else None),
            "wall_s": self.wall_s,
        }


def _prompt(rng: random.Random, tokens: int) -> str:
    # Each word with its leading space is one cl100k token; the chat framing adds a few more.
    return "".join(" " + rng.choice(WORDS) for _ in range(max(1, tokens)))


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
    profile = get_profile(profile_name)
    sim_runner, sim_url = await serve_app(create_sim_app(profile, time_scale=time_scale,
                                                      metrics_period_ms=metrics_period_ms))
    # The proxy samples faster than the counter updates (in wall time: the period over the time scale).
    interval_ms = max(10.0, metrics_period_ms / time_scale / 4)
    config = load_config(overrides={"meter": {"kind": "simulated", "interval_ms": interval_ms},
                                    "storage": {"path": ":memory:"},
                                    "attribution": {"idle": idle, "prefill_weight": prefill_weight}})
    config = dataclasses.replace(config, upstreams=(UpstreamConfig(name="sim", url=sim_url,
                                                                   gpus=tuple(range(profile.num_gpus))),))
    proxy_runner, proxy_url = await serve_app(create_app(config))
    report = AccuracyReport(profile=profile_name, idle=idle)
    rng = random.Random(workload.seed)
    plan = [
        (rng.randint(*workload.prompt_tokens), rng.randint(*workload.output_tokens),
         rng.random() < workload.stream_share)
        for _ in range(workload.requests)
    ]
    client = openai.AsyncOpenAI(base_url=f"{proxy_url}/v1", api_key="sk-accuracy", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(workload.concurrency)
    pending: list[tuple[str, str, bool, float | None]] = []
    loop = asyncio.get_running_loop()
    started = loop.time()

    async def one(i: int, prompt_tokens: int, output_tokens: int, stream: bool) -> None:
        messages: list[ChatCompletionMessageParam] = [
            {"role": "user", "content": _prompt(random.Random(i), prompt_tokens)}]
        async with gate:
            extra = {"ignore_eos": True}
            if stream:
                async with client.chat.completions.with_streaming_response.create(
                    model=profile.model_id, messages=messages, max_tokens=output_tokens, stream=True,
                    stream_options={"include_usage": True}, extra_body=extra,
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
                    model=profile.model_id, messages=messages, max_tokens=output_tokens,
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
            # Let the counter publish past the last request's end, then wait until every record settled.
            for _ in range(500):
                records = {r["request_id"]: r for r in
                           (await http.get(f"{proxy_url}/scer/requests?limit=10000")).json()["data"]}
                if all(records.get(rid, {}).get("settled") for rid, *_ in pending):
                    break
                await asyncio.sleep(0.02)
            for rid, completion_id, stream, header_j in pending:
                truth = (await http.get(f"{sim_url}/sim/truth/{completion_id}")).json()
                record = records.get(rid, {})
                report.results.append(RequestResult(
                    request_id=rid, stream=stream, prompt_tokens=truth["prompt_tokens"],
                    completion_tokens=truth["completion_tokens"], true_j=truth["energy_j"], header_j=header_j,
                    settled_j=record.get("energy_j") if record.get("settled") else None,
                ))
            summary = (await http.get(f"{proxy_url}/scer/summary")).json()
        meter_state = proxy_runner.app[METERS]["sim"]
        report.measured_j = meter_state.timeline.measured_j
        report.idle_j = meter_state.timeline.idle_j + meter_state.timeline.pending_idle_j
        report.attributed_j = summary["totals"]["energy_j"] or 0.0
        if meter_state.first_reading is not None and meter_state.last_reading is not None:
            report.counter_j = meter_state.last_reading.energy_j - meter_state.first_reading.energy_j
    finally:
        await client.close()
        await proxy_runner.cleanup()
        await sim_runner.cleanup()
    return report



