"""The DCGM exporter meter against a real exporter-shaped server on port 0: parsing, device selection,
failures as MeterError, and the instant a reading is stamped at."""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from scer_proxy.meters import MeterError
from scer_proxy.meters.dcgm import DcgmMeter, Sample, parse_energy_mj, select_devices
from tests.servers import start_site

PAGE = (
    "# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).\n"
    "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n"
    'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0",UUID="GPU-aaaa",modelName="NVIDIA H100 80GB HBM3"} 1500\n'
    'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="1",UUID="GPU-bbbb",modelName="NVIDIA H100 80GB HBM3"} 2500.5\n'
    'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION_RATE{gpu="0"} 99\n'
    'DCGM_FI_DEV_POWER_USAGE{gpu="0"} 300\n'
)


class Exporter:
    """An exporter on port 0 that waits ``delay_s`` on each side of the instant its answer stands for
    (kept in ``taken_s``), then answers ``body`` with ``status``."""

    def __init__(self) -> None:
        self.body, self.status, self.delay_s = PAGE, 200, 0.0
        self.taken_s: list[float] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _metrics(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.delay_s)
        self.taken_s.append(time.monotonic())
        await asyncio.sleep(self.delay_s)
        return web.Response(text=self.body, status=self.status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner, base = await start_site(app)
        self.url = base + "/metrics"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def exporter() -> AsyncIterator[Exporter]:
    server = Exporter()
    await server.start()
    yield server
    await server.close()


def test_parse_keeps_only_the_energy_metric_with_its_labels() -> None:
    samples = parse_energy_mj(PAGE)
    assert samples == [
        Sample(1500.0, {"gpu": "0", "UUID": "GPU-aaaa", "modelName": "NVIDIA H100 80GB HBM3"}),
        Sample(2500.5, {"gpu": "1", "UUID": "GPU-bbbb", "modelName": "NVIDIA H100 80GB HBM3"}),
    ]
    # Lines that are not a sample of the metric (a longer name, a bad value, no value) are skipped.
    assert (
        parse_energy_mj(
            'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0"} nan-ish\n'
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTIONX 5\nDCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION\n"
        )
        == []
    )


def test_select_devices_by_index_or_uuid_in_joules() -> None:
    samples = parse_energy_mj(PAGE)
    assert select_devices(samples, []) == {"0": 1.5, "1": 2.5005}
    assert select_devices(samples, [1]) == {"1": 2.5005}
    assert select_devices(samples, ["GPU-aaaa"]) == {"0": 1.5}
    with pytest.raises(MeterError, match="no DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION sample for GPU 7"):
        select_devices(samples, [7])


async def test_reading_sums_the_selected_gpus_and_names_them(exporter: Exporter) -> None:
    meter = DcgmMeter(exporter.url, gpus=[0, 1])
    try:
        reading = await meter.read()
    finally:
        await meter.close()
    assert reading.energy_j == pytest.approx(4.0005)
    assert reading.devices_j == {"0": 1.5, "1": 2.5005}
    assert meter.describe() == {
        "kind": "dcgm",
        "url": exporter.url,
        "devices": ["0: NVIDIA H100 80GB HBM3", "1: NVIDIA H100 80GB HBM3"],
    }


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (503, "busy", "answered HTTP 503"),
        (200, "# nothing here\n", "no DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION sample for GPUs [3]"),
    ],
)
async def test_failures_are_meter_errors(exporter: Exporter, status: int, body: str, message: str) -> None:
    exporter.status, exporter.body = status, body
    meter = DcgmMeter(exporter.url, gpus=[3] if status == 200 else [])
    try:
        with pytest.raises(MeterError, match=re.escape(message)):
            await meter.read()
    finally:
        await meter.close()


async def test_an_exporter_that_is_not_there_is_a_meter_error() -> None:
    meter = DcgmMeter("http://127.0.0.1:9/metrics", timeout_s=1.0)
    try:
        with pytest.raises(MeterError, match=re.escape("cannot read http://127.0.0.1:9/metrics")):
            await meter.read()
    finally:
        await meter.close()


async def test_a_reading_is_stamped_at_the_middle_of_its_round_trip(exporter: Exporter) -> None:
    # The clock: 100 s when the scrape is sent, 100.5 s when its answer is back.
    ticks = itertools.chain([100.0, 100.5], itertools.repeat(200.0))
    meter = DcgmMeter(exporter.url, clock=lambda: next(ticks))
    try:
        reading = await meter.read()
    finally:
        await meter.close()
    assert reading.t_s == 100.25


async def test_a_slow_round_trip_is_stamped_near_the_instant_the_value_stands_for(exporter: Exporter) -> None:
    # 0.3 s on each side of the value: the time after the answer is 0.3 s late, the middle is not.
    exporter.delay_s = 0.3
    meter = DcgmMeter(exporter.url)
    try:
        reading = await meter.read()
        answered_s = time.monotonic()
    finally:
        await meter.close()
    (taken_s,) = exporter.taken_s
    assert answered_s - taken_s >= 0.3
    assert abs(reading.t_s - taken_s) < 0.1, (reading.t_s - taken_s, answered_s - taken_s)
