"""The proxy's metering end to end on a real GPU: per-request energy against the GPU's own counter.

``bench/gpu_check.py`` checks the NVML meter by itself; this checks the serving path around it. Two
processes, on a machine with an NVIDIA GPU:

- ``bench/gpu_upstream.py``: an OpenAI-compatible engine with continuous batching whose tokens cost
  real GPU work (8 GiB of bf16 weights read every decode step, prompts run as one batch);
- ``scer-proxy serve --meter auto`` in front of it (the check fails unless auto chose NVML), with
  ``attribution.idle = "separate"`` and an in-memory ledger.

This process reads the GPU's energy counter (``nvmlDeviceGetTotalEnergyConsumption``) every 2 ms in a
thread, as the reference, and sends requests with the official openai client.

1. **Isolated requests**, one at a time with idle gaps, half streamed: the reference energy of each is
   the counter's increase over the request's span at the proxy (its record's ``started_at`` to
   ``ended_at``, taken to this process's monotonic clock; the counter is interpolated between its
   updates). The proxy's settled figure (``energy_gpu_j``, before PUE) and its response-time figure
   (header or ``usage.scer``) are compared with it. With nothing else running, all of the GPU's energy
   in that span is the request's, so this is a truth on real hardware. (The client's span is longer
   by the client's and the proxy's own work at each end, with the GPU idle: its figure is reported
   too, ``reference_client_span_j``, but a loaded machine stretches those ends, so it is not the
   truth the proxy is held to.)
2. **Concurrent requests** (continuous batching, mixed sizes): no per-request truth exists, so it checks
   conservation (attributed + idle against the energy the meter measured), the meter's measured energy
   against the reference counter over the same span, and that every record settled with source
   ``nvml``.

Usage: ``python bench/gpu_serve_check.py [--json FILE]`` (about a minute; figures also to
``$OUT/gpu_serve_check.json`` when ``OUT`` is set). ``--cpu`` dry-runs the same steps with no GPU: the
upstream runs numpy and models a counter at ``/metrics``, the proxy meters it with ``--meter
simulated``. The reference is then the model itself, exact at any instant (``/metrics/model``); the
thread still reads ``/metrics`` every 5 ms, and its figures are reported beside (``polled_reference_j``)
(this checks the script, not a GPU). Exits 2 when no GPU answers NVML, 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import openai  # noqa: E402

from bench.harness.accuracy import prompt_text, spawn_python, stop_process  # noqa: E402
from scer_proxy.meters.dcgm import parse_energy_mj  # noqa: E402
from scer_proxy.proxy.serving import free_port  # noqa: E402

MODEL = "gpu-load-8b"
UPSTREAM = Path(__file__).resolve().parent / "gpu_upstream.py"


class Counter(threading.Thread):
    """Reads a cumulative energy counter (joules) every ``step_s``; interpolates it between its updates.

    A value is stamped at the middle of the read that first saw it (a read takes ms: NVML's 3 to 5, an
    HTTP scrape's 1 or more), not at its end, which put the counter's curve late by about half a read.
    """

    def __init__(self, read_j: Callable[[], float], step_s: float) -> None:
        super().__init__(name="reference-counter", daemon=True)
        self.read_j, self.step_s = read_j, step_s
        self.times: list[float] = []  # monotonic time a new value was first seen
        self.values: list[float] = []
        self.stop_event = threading.Event()
        self.reads = 0
        self.read_errors = 0

    def run(self) -> None:
        while not self.stop_event.is_set():
            before = time.monotonic()
            try:
                value = self.read_j()
            except httpx.HTTPError:
                # A scrape that timed out (the --cpu upstream's loop busy with a step on a loaded machine)
                # is a missed sample, not the end of the reference: skip it and read again.
                self.read_errors += 1
                time.sleep(self.step_s)
                continue
            now = (before + time.monotonic()) / 2.0
            self.reads += 1
            if not self.values or value != self.values[-1]:
                self.times.append(now)
                self.values.append(value)
            time.sleep(self.step_s)

    def at(self, t: float) -> float:
        i = bisect.bisect_right(self.times, t)
        if i == 0:
            return self.values[0]
        if i == len(self.times):
            return self.values[-1]
        t0, t1, v0, v1 = self.times[i - 1], self.times[i], self.values[i - 1], self.values[i]
        return v0 + (v1 - v0) * (t - t0) / (t1 - t0)

    def update_period_ms(self) -> float | None:
        gaps = [b - a for a, b in zip(self.times, self.times[1:], strict=False)]
        return statistics.median(gaps) * 1000.0 if gaps else None


class ModelCounter:
    """The --cpu upstream's modelled counter, from ``/metrics/model``: joules at any instant, exactly."""

    def __init__(self, model: dict[str, Any]) -> None:
        self.idle_w, self.busy_w, self.started_s = model["idle_w"], model["busy_w"], model["started_s"]
        spans = sorted((float(a), float(b)) for a, b in model["busy_spans_s"])
        self.starts = [a for a, _b in spans]
        self.ends = [b for _a, b in spans]
        self.busy_before = list(itertools.accumulate((b - a for a, b in spans), initial=0.0))

    def at(self, t: float) -> float:
        i = bisect.bisect_right(self.starts, t)  # the steps begun by t; the last may be running at t
        busy_s = self.busy_before[i - 1] + min(t, self.ends[i - 1]) - self.starts[i - 1] if i else 0.0
        return self.idle_w * (t - self.started_s) + (self.busy_w - self.idle_w) * busy_s


def nvml_reader(gpu: int) -> Callable[[], float]:
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(gpu)
    return lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0


def metrics_reader(url: str) -> Callable[[], float]:
    """The DCGM-style counter at ``url``, parsed as the proxy's DCGM meter parses it (joules, all GPUs)."""
    client = httpx.Client(timeout=2.0)

    def read() -> float:
        samples = parse_energy_mj(client.get(url).text)
        assert samples, "the upstream's /metrics has no energy counter"
        return sum(sample.value_mj for sample in samples) / 1000.0

    return read


@contextlib.asynccontextmanager
async def stack(tmp: Path, *, cpu: bool) -> AsyncIterator[tuple[str, str]]:
    up_url, px_url = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    config = (
        f'[meter]\nkind = "{"simulated" if cpu else "auto"}"\ninterval_ms = 50.0\n'
        f'[storage]\npath = ":memory:"\n[attribution]\nidle = "separate"\n[server]\nlog_level = "warning"\n'
        f'[[upstreams]]\nname = "gpu"\nurl = "{up_url}"\ngpus = [0]\n'
    )
    (tmp / "proxy.toml").write_text(config)
    upstream = await spawn_python(
        [str(UPSTREAM), up_url.rsplit(":", 1)[1], *(["--cpu"] if cpu else [])],
        tmp / "upstream.log",
        f"{up_url}/health",
        timeout_s=120.0,
    )
    try:
        proxy = await spawn_python(
            [
                "-m",
                "scer_proxy",
                "serve",
                "--config",
                str(tmp / "proxy.toml"),
                "--listen",
                px_url.removeprefix("http://"),
            ],
            tmp / "proxy.log",
            f"{px_url}/scer/health",
        )
        try:
            yield up_url, px_url
        finally:
            await stop_process(proxy)
    finally:
        await stop_process(upstream)


async def one(
    client: openai.AsyncOpenAI, *, seed: int, prompt_tokens: int, max_tokens: int, stream: bool
) -> dict[str, Any]:
    messages: Any = [{"role": "user", "content": prompt_text(random.Random(seed), prompt_tokens)}]
    wall_offset_s = time.time() - time.monotonic()  # to take the proxy's record times to this clock
    started = time.monotonic()
    if stream:
        async with client.chat.completions.with_streaming_response.create(
            model=MODEL,
            messages=messages,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        ) as resp:
            rid = resp.headers["x-scer-request-id"]
            header_j = None
            async for chunk in await resp.parse():
                if chunk.usage is not None:
                    header_j = (chunk.usage.model_extra or {}).get("scer", {}).get("energy_j")
    else:
        raw = await client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=max_tokens
        )
        rid = raw.headers["x-scer-request-id"]
        header_j = float(raw.headers["x-scer-energy-j"]) if "x-scer-energy-j" in raw.headers else None
    return {
        "request_id": rid,
        "stream": stream,
        "prompt_tokens_asked": prompt_tokens,
        "max_tokens": max_tokens,
        "start_s": started,
        "end_s": time.monotonic(),
        "header_j": header_j,
        "wall_offset_s": wall_offset_s,
    }


async def settled(
    http: httpx.AsyncClient, px_url: str, ids: list[str], timeout_s: float = 30.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        records = {
            r["request_id"]: r for r in (await http.get(f"{px_url}/scer/requests?limit=10000")).json()["data"]
        }
        if all(records.get(rid, {}).get("settled") for rid in ids) or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.1)


def rel(a: float | None, b: float) -> float | None:
    return None if a is None or b == 0 else (a - b) / b


async def run(args: argparse.Namespace) -> dict[str, Any]:
    isolated_sizes = (
        [(60, 150), (400, 400), (1500, 800)] if not args.cpu else [(30, 60), (80, 150), (150, 300)]
    )
    with tempfile.TemporaryDirectory(prefix="scer-gpu-serve-") as tmp_name:
        tmp = Path(tmp_name)
        async with stack(tmp, cpu=args.cpu) as (up_url, px_url):
            counter = Counter(
                metrics_reader(up_url + "/metrics") if args.cpu else nvml_reader(args.gpu),
                0.005 if args.cpu else 0.002,
            )
            counter.start()
            client = openai.AsyncOpenAI(
                base_url=f"{px_url}/v1", api_key="sk-gpu-check", max_retries=0, timeout=600
            )
            async with httpx.AsyncClient(timeout=30) as http:
                warm = await one(client, seed=0, prompt_tokens=50, max_tokens=20, stream=False)
                await asyncio.sleep(args.gap_s)
                # 1. isolated requests
                isolated = []
                for i, (prompt, out) in enumerate(isolated_sizes * 2):
                    isolated.append(
                        await one(
                            client,
                            seed=i + 1,
                            prompt_tokens=prompt,
                            max_tokens=out,
                            stream=i >= len(isolated_sizes),
                        )
                    )
                    await asyncio.sleep(args.gap_s)
                # 2. concurrent requests
                rng = random.Random(7)
                gate = asyncio.Semaphore(args.concurrency)

                async def gated(i: int) -> dict[str, Any]:
                    async with gate:
                        prompt = rng.randint(20, 1500 if not args.cpu else 150)
                        return await one(
                            client,
                            seed=100 + i,
                            prompt_tokens=prompt,
                            max_tokens=rng.randint(50, 600 if not args.cpu else 200),
                            stream=i % 2 == 0,
                        )

                window_start = time.monotonic()
                concurrent = list(await asyncio.gather(*(gated(i) for i in range(args.requests))))
                window_end = time.monotonic()
                ids = [r["request_id"] for r in [warm, *isolated, *concurrent]]
                records = await settled(http, px_url, ids)
                summary = (await http.get(f"{px_url}/scer/summary")).json()
                meter = summary["meter"]["upstreams"][0]  # read with the idle energy, at the same instant
                model = (await http.get(f"{up_url}/metrics/model")).json() if args.cpu else None
            await client.close()
            counter.stop_event.set()
            counter.join(5)
    reference: Counter | ModelCounter = ModelCounter(model) if model is not None else counter

    rows = []
    window_s = min(0.4, 0.8 * args.gap_s)  # of the idle gap before and after each isolated request
    for r in isolated:
        record = records.get(r["request_id"], {})
        # The request's span at the proxy, on this clock (the wall clock's offset taken as it was sent).
        start_s = record["started_at"] - r["wall_offset_s"] if record.get("started_at") else r["start_s"]
        end_s = record["ended_at"] - r["wall_offset_s"] if record.get("ended_at") else r["end_s"]
        truth_j = reference.at(end_s) - reference.at(start_s)
        settled_j = record.get("energy_gpu_j") if record.get("settled") else None
        # The GPU does not drop to idle power the instant its work ends: the energy above idle in the
        # window after the end (idle power taken from the window before the start) is shown apart.
        idle_w = (reference.at(start_s) - reference.at(start_s - window_s)) / window_s
        after_j = reference.at(end_s + window_s) - reference.at(end_s) - idle_w * window_s
        rows.append(
            {
                "stream": r["stream"],
                "prompt_tokens": record.get("prompt_tokens"),
                "completion_tokens": record.get("completion_tokens"),
                "duration_s": end_s - start_s,
                "client_duration_s": r["end_s"] - r["start_s"],
                "reference_j": truth_j,
                "settled_j": settled_j,
                "header_j": r["header_j"],
                "reference_client_span_j": reference.at(r["end_s"]) - reference.at(r["start_s"]),
                "polled_reference_j": counter.at(end_s) - counter.at(start_s) if model is not None else None,
                "settled_vs_reference": rel(settled_j, truth_j),
                "header_vs_reference": rel(r["header_j"], truth_j),
                "idle_w": idle_w,
                "after_end_above_idle_j": after_j,
                "settled_vs_reference_and_after": rel(settled_j, truth_j + after_j),
                "energy_source": record.get("energy_source"),
            }
        )
    all_records = [records.get(rid, {}) for rid in ids]
    attributed_j = sum(r.get("energy_gpu_j") or 0.0 for r in all_records)
    pue = 1.0  # the default; energy_gpu_j is before PUE, and idle_energy_j is with it
    measured_j = meter["measured_j"]
    per_token = [
        r["energy_gpu_j"] / r["completion_tokens"]
        for r in (records[c["request_id"]] for c in concurrent)
        if r.get("energy_gpu_j") and r.get("completion_tokens")
    ]
    errors = [abs(x["settled_vs_reference"]) for x in rows if x["settled_vs_reference"] is not None]
    return {
        "meter_kind": meter["kind"],
        "meter_note": meter.get("note"),
        "meter_devices": meter.get("devices"),
        "meter_update_period_ms": meter.get("update_period_ms"),
        "meter_interval_ms": meter.get("interval_ms"),
        "reference": "the upstream's counter model"
        if model is not None
        else "the NVML counter, read every 2 ms",
        "reference_update_period_ms": counter.update_period_ms(),
        "isolated": rows,
        "isolated_settled_abs_error_median": statistics.median(errors) if errors else None,
        "isolated_settled_abs_error_max": max(errors) if errors else None,
        "concurrent_requests": len(concurrent),
        "concurrent_wall_s": window_end - window_start,
        "concurrent_reference_j": reference.at(window_end) - reference.at(window_start),
        "concurrent_attributed_j": sum(
            records[c["request_id"]].get("energy_gpu_j") or 0.0 for c in concurrent
        ),
        "concurrent_j_per_output_token": {
            "median": statistics.median(per_token),
            "min": min(per_token),
            "max": max(per_token),
        }
        if per_token
        else None,
        "all_settled": all(r.get("settled") for r in all_records),
        "sources": sorted({str(r.get("energy_source")) for r in all_records}),
        "attributed_j": attributed_j,
        "idle_j": summary["idle_energy_j"] / pue,
        "measured_j": measured_j,
        "conservation_rel": abs(attributed_j + summary["idle_energy_j"] / pue - measured_j) / measured_j
        if measured_j
        else None,
        "counter_reads": counter.reads,
        "counter_read_errors": counter.read_errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument(
        "--cpu", action="store_true", help="dry run with no GPU (numpy upstream, modelled counter)"
    )
    parser.add_argument("--requests", type=int, default=48, help="requests of the concurrent phase")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--gap-s", type=float, default=1.0, help="idle time between isolated requests")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if not args.cpu:
        from scer_proxy.meters.nvml import nvml_available

        if not nvml_available():
            print(
                "no NVIDIA GPU answers through NVML on this machine: nothing to check (--cpu dry-runs it)",
                file=sys.stderr,
            )
            return 2
    figures = asyncio.run(run(args))
    for row in figures["isolated"]:
        print(
            f"isolated {'stream' if row['stream'] else 'plain '} prompt {row['prompt_tokens']:>5} "
            f"out {row['completion_tokens']:>4} {row['duration_s']:6.2f} s  reference {row['reference_j']:9.2f} J "
            f"(client span {row['client_duration_s']:5.2f} s {row['reference_client_span_j']:9.2f} J)  "
            f"settled {row['settled_j'] or float('nan'):9.2f} J ({100 * (row['settled_vs_reference'] or 0):+6.2f} %)  "
            f"header {row['header_j'] or float('nan'):9.2f} J ({100 * (row['header_vs_reference'] or 0):+6.2f} %)  "
            f"after the end {row['after_end_above_idle_j']:6.2f} J above {row['idle_w']:5.1f} W idle"
        )
    for key, value in figures.items():
        if key != "isolated":
            print(f"{key:36} {value:.6g}" if isinstance(value, float) else f"{key:36} {value}")
    conservation, median = figures["conservation_rel"], figures["isolated_settled_abs_error_median"]
    checks = {
        "auto chose the GPU's own counter": args.cpu or figures["meter_kind"] == "nvml",
        "every record settled": figures["all_settled"],
        "conservation within 0.1 %": conservation is not None and conservation <= 1e-3,
        "isolated settled median error <= 5 %": median is not None and median <= 0.05,
    }
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    figures["checks"] = checks
    for path in [
        args.json,
        Path(os.environ["OUT"]) / "gpu_serve_check.json" if os.environ.get("OUT") else None,
    ]:
        if path is not None:
            path.write_text(json.dumps(figures, indent=2))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
