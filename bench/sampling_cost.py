"""What sampling the meter costs: CPU of the real sampler at 10 Hz, as a share of one core.

Method
------
The simulator runs in a child process (``python -m scer_proxy simulate``), so its CPU is not counted.
This process runs, phase after phase, each for ``--seconds`` on its own event loop (uvloop when
installed, as the proxy does):

- ``idle loop``: the baseline: a task that wakes every interval and does nothing else;
- ``dcgm``: :class:`scer_proxy.meters.sampler.UpstreamMeter` sampling a :class:`DcgmMeter` that scrapes the
  simulator's DCGM-style ``/metrics`` over loopback HTTP;
- ``nvml (fake)``: the same sampler over :class:`NvmlMeter` with the fake pynvml of the tests
  (``tests/fake_pynvml.py``) following an in-process simulator engine. This measures the Python side
  (sampler, meter, timeline); the real NVML call is a C call into the driver, whose latency
  ``bench/gpu_check.py`` measures on a GPU machine;
- ``rapl``: the same over :class:`RaplMeter`, when ``/sys/class/powercap`` is readable.

CPU is ``time.process_time()`` (user + system CPU of this process, all threads) across the phase,
divided by the phase's wall time: the share of one core. "Net" subtracts the idle loop's share.
The target: sampling at 10 Hz costs at most 1 % of one core.

Usage: ``python bench/sampling_cost.py [--seconds 20] [--interval-ms 100] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scer_proxy.attribution.timeline import Timeline  # noqa: E402
from scer_proxy.meters import Meter  # noqa: E402
from scer_proxy.meters.dcgm import DcgmMeter  # noqa: E402
from scer_proxy.meters.nvml import NvmlMeter  # noqa: E402
from scer_proxy.meters.rapl import RaplMeter, rapl_available  # noqa: E402
from scer_proxy.meters.sampler import UpstreamMeter  # noqa: E402
from scer_proxy.proxy.serving import free_port  # noqa: E402
from scer_proxy.sim import Engine, get_profile  # noqa: E402

TARGET_PERCENT = 1.0


@contextlib.contextmanager
def simulator() -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "scer_proxy", "simulate", "--listen", f"127.0.0.1:{port}"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the simulator did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


Window = tuple[int, float, float]  # reads, cpu seconds, wall seconds


async def _idle(seconds: float, interval_s: float) -> Window:
    """The baseline: the sampler's loop shape (timed sleep) with nothing to do."""
    wakes = 0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        wakes += 1
        await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))
    return wakes, time.process_time() - cpu0, time.perf_counter() - wall0


async def _sample(make_meter: Callable[[], Meter], seconds: float, interval_s: float) -> Window:
    upstream = UpstreamMeter(
        "bench", make_meter(), Timeline(), interval_s=interval_s, on_settled=lambda _name, _share: None
    )
    await upstream.sample_once()  # opening (NVML's period probe, the HTTP session) is not counted
    cpu0, wall0 = time.process_time(), time.perf_counter()
    upstream.start()
    await asyncio.sleep(seconds)
    await upstream.close()
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    if upstream.errors:
        raise RuntimeError(f"the meter failed {upstream.errors} times: {upstream.last_error}")
    return upstream.readings - 1, cpu_s, wall_s


def measure(name: str, work: Callable[[], Awaitable[Window]]) -> dict[str, Any]:
    loop = _new_loop()
    try:
        count, cpu_s, wall_s = loop.run_until_complete(work())
    finally:
        loop.close()
    return {
        "phase": name,
        "wall_s": wall_s,
        "cpu_s": cpu_s,
        "percent_of_core": 100.0 * cpu_s / wall_s,
        "reads": count,
        "reads_per_s": count / wall_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase (default 20)")
    parser.add_argument(
        "--interval-ms", type=float, default=100.0, help="sampling interval (default 100 = 10 Hz)"
    )
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    seconds, interval_s = args.seconds, args.interval_ms / 1000.0
    from tests.fake_pynvml import FakeNvml

    results: list[dict[str, Any]] = []
    print(
        f"sampling at {1 / interval_s:.1f} Hz for {seconds:.0f} s per phase; cpu = time.process_time() of this process"
    )
    with simulator() as sim_url:
        results.append(measure("idle loop (baseline)", lambda: _idle(seconds, interval_s)))
        results.append(
            measure(
                "dcgm (simulator /metrics over HTTP)",
                lambda: _sample(
                    lambda: DcgmMeter(sim_url + "/metrics", source="simulated"), seconds, interval_s
                ),
            )
        )

    def fake_nvml_meter() -> Meter:
        engine = Engine(get_profile("llama-3.1-8b-h100"), metrics_period_s=0.1)
        return NvmlMeter((0,), nvml=FakeNvml(engine))

    results.append(
        measure("nvml (fake pynvml, python side)", lambda: _sample(fake_nvml_meter, seconds, interval_s))
    )
    if rapl_available():
        results.append(measure("rapl (/sys/class/powercap)", lambda: _sample(RaplMeter, seconds, interval_s)))
    else:
        print("rapl: skipped (no readable /sys/class/powercap/intel-rapl:* on this machine)")

    base = results[0]["percent_of_core"]
    print(f"{'phase':40} {'wall s':>7} {'cpu s':>7} {'% core':>7} {'net %':>7} {'reads/s':>8} {'us/read':>8}")
    for r in results:
        r["net_percent_of_core"] = r["percent_of_core"] - base
        per_read = (
            (r["cpu_s"] - base / 100.0 * r["wall_s"]) / r["reads"] * 1e6 if r["reads"] else float("nan")
        )
        r["net_cpu_us_per_read"] = per_read
        print(
            f"{r['phase']:40} {r['wall_s']:7.2f} {r['cpu_s']:7.3f} {r['percent_of_core']:7.3f} "
            f"{r['net_percent_of_core']:7.3f} {r['reads_per_s']:8.2f} {per_read:8.1f}"
        )
    worst = max(r["percent_of_core"] for r in results[1:])
    verdict = "meets" if worst <= TARGET_PERCENT else "MISSES"
    print(
        f"target: at most {TARGET_PERCENT:.1f} % of one core at 10 Hz; worst gross figure {worst:.3f} % ({verdict})"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "interval_s": interval_s,
                    "seconds": seconds,
                    "pid": os.getpid(),
                    "target_percent": TARGET_PERCENT,
                    "phases": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
