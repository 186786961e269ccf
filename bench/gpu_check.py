"""A check of NvmlMeter against the GPU itself, for a machine with an NVIDIA GPU (under 2 minutes).

Over one window it loads the GPU with bursts of bf16 matrix products (torch; ``--bursts`` bursts of
``--burst-s`` seconds with ``--gap-s`` idle gaps) and measures the window's energy three ways:

1. ``meter``: :class:`scer_proxy.meters.nvml.NvmlMeter` (real pynvml), read at its recommended
   interval (``max(--interval-ms, detected update period)``) on an asyncio loop, as the proxy does;
2. ``counter``: ``nvmlDeviceGetTotalEnergyConsumption`` read directly at the window's two ends
   (back to back with the meter's first and last readings, so 1 and 2 should agree to within one
   update period's energy);
3. ``power``: ``nvmlDeviceGetPowerUsage`` (and ``NVML_FI_DEV_POWER_INSTANT`` where supported)
   sampled every ``--power-ms`` (10 ms) in a thread and integrated by the trapezoid rule.

It prints the joules, their relative differences, the update period detected by the meter and the
one seen by the 10 ms thread, the latency of the NVML calls, and how late the event loop wakes a 1 ms
sleeper meanwhile (the meter reads in its own thread, so its reads should not show there).
With ``$OUT`` set, the figures go to ``$OUT/gpu_check.json``. Without a GPU it says so and exits 2.

Usage: ``python bench/gpu_check.py [--gpu 0] [--bursts 3] [--burst-s 3] [--gap-s 2]``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scer_proxy.meters import Reading  # noqa: E402
from scer_proxy.meters.nvml import NvmlMeter, nvml_available  # noqa: E402


class PowerSampler(threading.Thread):
    """Reads power (mW), instant power (mW, if supported) and the counter (mJ) every ``step_s``."""

    def __init__(self, nvml: Any, handle: Any, step_s: float) -> None:
        super().__init__(name="power-sampler", daemon=True)
        self.nvml, self.handle, self.step_s = nvml, handle, step_s
        self.samples: list[tuple[float, float, float | None, int]] = []  # t, power mW, instant mW, counter mJ
        self.latency_s: dict[str, list[float]] = {"energy": [], "power": [], "instant": []}
        self.stop_event = threading.Event()
        self.instant_ok = True

    def _instant_mw(self) -> float | None:
        if not self.instant_ok:
            return None
        t0 = time.perf_counter()
        try:
            (value,) = self.nvml.nvmlDeviceGetFieldValues(self.handle, [self.nvml.NVML_FI_DEV_POWER_INSTANT])
        except self.nvml.NVMLError:
            self.instant_ok = False
            return None
        self.latency_s["instant"].append(time.perf_counter() - t0)
        if value.nvmlReturn != self.nvml.NVML_SUCCESS:
            self.instant_ok = False
            return None
        return float(value.value.uiVal)

    def sample(self) -> None:
        nvml, handle = self.nvml, self.handle
        t0 = time.perf_counter()
        counter = int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        t1 = time.perf_counter()
        power = float(nvml.nvmlDeviceGetPowerUsage(handle))
        t2 = time.perf_counter()
        instant = self._instant_mw()
        self.latency_s["energy"].append(t1 - t0)
        self.latency_s["power"].append(t2 - t1)
        self.samples.append((time.monotonic(), power, instant, counter))

    def run(self) -> None:
        next_s = time.monotonic()
        while not self.stop_event.is_set():
            self.sample()
            next_s += self.step_s
            self.stop_event.wait(max(0.0, next_s - time.monotonic()))


def trapezoid_j(points: list[tuple[float, float]]) -> float:
    """Integral of (t seconds, power mW) points, in joules."""
    return sum((p0 + p1) / 2.0 * (t1 - t0) for (t0, p0), (t1, p1) in itertools.pairwise(points)) / 1000.0


def counter_period_s(samples: list[tuple[float, float, float | None, int]]) -> float | None:
    changes = [t for (_t0, _p0, _i0, c0), (t, _p, _i, c) in itertools.pairwise(samples) if c != c0]
    intervals = [b - a for a, b in itertools.pairwise(changes)]
    return statistics.median(intervals) if intervals else None


def latency_us(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {
        "mean": statistics.fmean(ordered) * 1e6,
        "p50": ordered[len(ordered) // 2] * 1e6,
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
        "n": float(len(ordered)),
    }


async def loop_lag(lags: list[float], step_s: float = 0.001) -> None:
    """How late the event loop wakes a 1 ms sleeper, over and over: what a blocking meter read costs
    every request the proxy is relaying at that moment."""
    while True:
        start = time.perf_counter()
        await asyncio.sleep(step_s)
        lags.append(max(0.0, time.perf_counter() - start - step_s))


def rel(a: float, b: float) -> float | None:
    return None if b == 0 else (a - b) / b


def load(
    torch: Any,
    gpu: int,
    bursts: int,
    burst_s: float,
    gap_s: float,
    size: int,
    done: threading.Event,
    log: list[tuple[str, float]],
) -> None:
    """Bursts of bf16 matmuls on the selected GPU, with idle gaps before, between and after."""
    device = f"cuda:{gpu}"  # CUDA_DEVICE_ORDER=PCI_BUS_ID makes CUDA's index NVML's
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    time.sleep(gap_s)
    for _ in range(bursts):
        log.append(("burst_start", time.monotonic()))
        end = time.monotonic() + burst_s
        while time.monotonic() < end:
            for _ in range(10):
                torch.matmul(a, b)
            torch.cuda.synchronize()
        log.append(("burst_end", time.monotonic()))
        time.sleep(gap_s)
    done.set()


def idle(seconds: float, done: threading.Event) -> None:
    time.sleep(seconds)
    done.set()


async def run_check(args: argparse.Namespace, pynvml: Any) -> dict[str, Any]:
    meter = NvmlMeter((args.gpu,), nvml=pynvml)
    await meter.open()
    interval_s = meter.recommended_interval_s(args.interval_ms / 1000.0)
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(args.gpu)
        sampler = PowerSampler(pynvml, handle, args.power_ms / 1000.0)
        try:
            if args.fake:
                raise ImportError("--fake: no load")
            import torch
        except ImportError:
            torch = None
            print("torch is not installed: measuring an idle window only", file=sys.stderr)
        done = threading.Event()
        events: list[tuple[str, float]] = []
        if torch is not None:
            loader = threading.Thread(
                target=load,
                name="load",
                daemon=True,
                args=(torch, args.gpu, args.bursts, args.burst_s, args.gap_s, args.size, done, events),
            )
        else:
            loader = threading.Thread(
                target=idle, args=(args.bursts * (args.burst_s + args.gap_s), done), daemon=True
            )
        sampler.start()
        lags: list[float] = []
        ticker = asyncio.create_task(loop_lag(lags))
        await asyncio.sleep(0.2)
        readings: list[Reading] = [await meter.read()]
        counter0 = int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        t0 = time.monotonic()
        loader.start()
        read_latency: list[float] = []
        while not done.is_set():
            await asyncio.sleep(interval_s)
            start = time.perf_counter()
            readings.append(await meter.read())
            read_latency.append(time.perf_counter() - start)
        readings.append(await meter.read())
        counter1 = int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        t1 = time.monotonic()
        ticker.cancel()
        await asyncio.sleep(2 * args.power_ms / 1000.0)
        sampler.stop_event.set()
        sampler.join(5)
    finally:
        pynvml.nvmlShutdown()
    info = meter.describe()
    await meter.close()

    window = [s for s in sampler.samples if t0 <= s[0] <= t1]
    power_points = [(t, p) for t, p, _i, _c in window]
    instant_points = [(t, i) for t, _p, i, _c in window if i is not None]
    meter_j = readings[-1].energy_j - readings[0].energy_j
    counter_j = (counter1 - counter0) / 1000.0
    power_j = trapezoid_j(power_points)
    instant_j = trapezoid_j(instant_points) if len(instant_points) == len(power_points) else None
    return {
        "device": info["devices"],
        "method": info["method"],
        "mig": info["mig"],
        "window_s": t1 - t0,
        "interval_s": interval_s,
        "meter_update_period_ms": info["update_period_ms"],
        "thread_counter_period_ms": None if (p := counter_period_s(sampler.samples)) is None else p * 1000.0,
        "meter_j": meter_j,
        "counter_j": counter_j,
        "power_usage_integrated_j": power_j,
        "power_instant_integrated_j": instant_j,
        "meter_vs_counter": rel(meter_j, counter_j),
        "power_usage_vs_counter": rel(power_j, counter_j),
        "power_instant_vs_counter": None if instant_j is None else rel(instant_j, counter_j),
        "monotonic": all(b.energy_j >= a.energy_j for a, b in itertools.pairwise(readings)),
        "meter_reads": len(readings),
        "mean_power_w": counter_j / (t1 - t0) if t1 > t0 else None,
        "loop_lag_us": latency_us(lags),
        "latency_us": {
            "meter_read": latency_us(read_latency),
            "energy_counter": latency_us(sampler.latency_s["energy"]),
            "power_usage": latency_us(sampler.latency_s["power"]),
            "power_instant": latency_us(sampler.latency_s["instant"]),
        },
        "resets": info["resets"],
        "stalled": info["stalled"],
        "load": "torch bf16 matmul" if torch is not None else "none (torch missing)",
        "bursts": [(name, t - t0) for name, t in events],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="NvmlMeter against the GPU's own counter and power readings")
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--bursts", type=int, default=3)
    parser.add_argument("--burst-s", type=float, default=3.0)
    parser.add_argument("--gap-s", type=float, default=2.0)
    parser.add_argument("--size", type=int, default=8192, help="matrix side of the matmuls")
    parser.add_argument("--interval-ms", type=float, default=100.0, help="configured sampling interval")
    parser.add_argument("--power-ms", type=float, default=10.0, help="power sampling step of the reference")
    parser.add_argument(
        "--fake",
        action="store_true",
        help="dry run of this script over tests/fake_pynvml.py (an idle simulated H100), no GPU",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # before torch initialises CUDA
    if args.fake:
        from scer_proxy.sim import Engine, get_profile
        from tests.fake_pynvml import FakeNvml

        nvml: Any = FakeNvml(Engine(get_profile("llama-3.1-8b-h100"), metrics_period_s=0.1))
    else:
        import pynvml

        nvml = pynvml
    if not nvml_available(nvml):
        print(
            "no NVIDIA GPU answers through NVML on this machine (no driver or no device): nothing to check",
            file=sys.stderr,
        )
        return 2
    figures = asyncio.run(run_check(args, nvml))
    for key, value in figures.items():
        if isinstance(value, float):
            print(f"{key:28} {value:.6g}")
        else:
            print(f"{key:28} {value}")
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_check.json").write_text(json.dumps(figures, indent=2))
        print(f"wrote {out}/gpu_check.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
