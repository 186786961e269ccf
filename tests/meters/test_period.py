"""The counter's update period, measured between observed changes: a counter updating every 100 ms, 500 ms
or 1 s, read every 25 ms (with jitter, from an arbitrary first read), is detected within 10 %; for NVML
(the probe at open) and for the sampler of any meter, a DCGM exporter's collection interval among them.
And a counter reset never shows as a negative figure."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from scer_proxy.attribution.timeline import Timeline, TimelineConfig
from scer_proxy.meters import Reading
from scer_proxy.meters.dcgm import DcgmMeter
from scer_proxy.meters.period import ChangeGaps
from scer_proxy.meters.sampler import UpstreamMeter
from tests.servers import start_site

PERIODS_S = [0.1, 0.5, 1.0]
READ_S = 0.025


class SteppingCounter:
    """Devices whose counters step by 10 J every ``period_s``, each at its own phase."""

    def __init__(self, period_s: float, devices: int = 1, *, seed: int = 0) -> None:
        rng = random.Random(seed)
        self.period_s = period_s
        self.phases_s = [rng.uniform(0.0, period_s) for _ in range(devices)]

    def values_j(self, t_s: float) -> dict[str, float]:
        return {
            str(i): 1000.0 + 10.0 * math.floor((t_s - phase) / self.period_s)
            for i, phase in enumerate(self.phases_s)
        }


class ScriptedMeter:
    """A meter over a :class:`SteppingCounter` on a fake clock."""

    source = "simulated"

    def __init__(self, counter: SteppingCounter, clock: list[float]) -> None:
        self.counter, self.clock = counter, clock

    async def read(self) -> Reading:
        devices = self.counter.values_j(self.clock[0])
        return Reading(self.clock[0], sum(devices.values()), devices)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.source, "devices": []}

    async def close(self) -> None:
        pass


def _reads(seconds: float, *, seed: int) -> list[float]:
    """Read times every 25 ms with +-5 ms of jitter, from an arbitrary start."""
    rng = random.Random(seed)
    t_s, out = 100.0 + rng.uniform(0.0, 1.0), []
    while len(out) * READ_S < seconds:
        out.append(t_s)
        t_s += READ_S + rng.uniform(-0.005, 0.005)
    return out


@pytest.mark.parametrize("period_s", PERIODS_S)
def test_change_gaps_find_the_period_within_ten_percent(period_s: float) -> None:
    for seed in range(5):
        counter, gaps = SteppingCounter(period_s, seed=seed), ChangeGaps()
        for t_s in _reads(8 * period_s + 0.5, seed=seed):
            gaps.observe(t_s, counter.values_j(t_s))
        assert gaps.period_s == pytest.approx(period_s, rel=0.10), (seed, gaps.period_s)


@pytest.mark.parametrize("devices", [1, 4])
@pytest.mark.parametrize("period_s", PERIODS_S)
async def test_the_sampler_measures_the_period_between_changes(period_s: float, devices: int) -> None:
    """Four GPUs stepping at their own phases change the sum four times a period: each is timed alone."""
    clock = [0.0]
    for seed in range(3):
        meter = ScriptedMeter(SteppingCounter(period_s, devices, seed=seed), clock)
        runtime = UpstreamMeter(
            "up",
            meter,
            Timeline(TimelineConfig(idle="separate")),
            interval_s=READ_S,
            on_settled=lambda u, s: None,
        )
        for t_s in _reads(8 * period_s + 0.5, seed=seed):
            clock[0] = t_s
            await runtime.sample_once()
        assert runtime.update_period_s == pytest.approx(period_s, rel=0.10), (seed, runtime.update_period_s)
        assert runtime.describe()["update_period_ms"] == pytest.approx(period_s * 1000.0, rel=0.10)


class CollectingExporter:
    """A DCGM exporter on port 0 whose collection runs every ``period_s``: its counter moves only then."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self.started_s = time.monotonic()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        collections = math.floor((time.monotonic() - self.started_s) / self.period_s)
        value_mj = 5_000_000 + 7_000 * collections
        return web.Response(text=f'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{gpu="0",UUID="GPU-x"}} {value_mj}\n')

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner, base = await start_site(app)
        self.url = base + "/metrics"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def exporter() -> AsyncIterator[CollectingExporter]:
    server = CollectingExporter(0.1)
    await server.start()
    yield server
    await server.close()


async def test_a_dcgm_exporters_collection_interval_is_detected(exporter: CollectingExporter) -> None:
    """The sampler reading a real exporter page every 25 ms finds its 100 ms collection interval."""
    runtime = UpstreamMeter(
        "up",
        DcgmMeter(exporter.url, gpus=[0]),
        Timeline(TimelineConfig(idle="separate")),
        interval_s=READ_S,
        on_settled=lambda u, s: None,
    )
    runtime.start()
    try:
        await asyncio.sleep(2.0)  # about 20 collections
    finally:
        await runtime.close()
    assert runtime.errors == 0
    assert runtime.update_period_s == pytest.approx(0.1, rel=0.10)


async def test_a_counter_reset_never_shows_a_negative_figure() -> None:
    """A GPU's counter restarts from near zero (a driver reload) while the other goes on: only the reset
    GPU's interval is lost; health's ``counter_j`` and ``measured_j`` stay the energy counted, never
    negative."""
    clock = [0.0]
    values = {"0": 5_000_000.0, "1": 4_000_000.0}

    class ResettingMeter(ScriptedMeter):
        async def read(self) -> Reading:
            return Reading(clock[0], sum(values.values()), dict(values))

    runtime = UpstreamMeter(
        "up",
        ResettingMeter(SteppingCounter(1.0), clock),
        Timeline(TimelineConfig(idle="separate")),
        interval_s=0.1,
        on_settled=lambda u, s: None,
    )
    await runtime.sample_once()
    for step in range(1, 11):
        clock[0] = step * 0.1
        values["1"] += 30.0
        values["0"] = 12.0 if step == 5 else values["0"] + 20.0  # the reset: 5 MJ down to 12 J
        await runtime.sample_once()
        info = runtime.describe()
        assert info["counter_j"] >= 0 and info["measured_j"] >= 0
    info = runtime.describe()
    assert info["counter_resets"] == 1
    # GPU 1: 10 x 30 J; GPU 0: 9 x 20 J (its reset interval lost, nothing invented)
    assert info["counter_j"] == pytest.approx(300.0 + 180.0)
    assert info["measured_j"] == pytest.approx(info["counter_j"])
