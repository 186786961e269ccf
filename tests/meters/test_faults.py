"""A meter that fails mid-run: requests keep being served, records are flagged, and it recovers."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from scer_proxy.meters import MeterError, Reading
from scer_proxy.meters.dcgm import DcgmMeter
from scer_proxy.sim import create_sim_app
from tests.servers import ThreadedServers


class SwitchableMeter:
    """The simulator's counter through a DcgmMeter, with a switch that breaks it or resets the counter."""

    source = "simulated"

    def __init__(self, url: str) -> None:
        self.inner = DcgmMeter(url + "/metrics", source="simulated")
        self.broken = False
        self.offset_j = 0.0

    async def read(self) -> Reading:
        if self.broken:
            raise MeterError("switched off by the test")
        reading = await self.inner.read()
        devices = {k: v - self.offset_j / len(reading.devices_j) for k, v in reading.devices_j.items()}
        return Reading(reading.t_s, reading.energy_j - self.offset_j, devices)

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    async def close(self) -> None:
        await self.inner.close()


def _wait(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_meter_failure_and_recovery_and_counter_reset(
    servers: ThreadedServers, start_proxy: Callable[..., str]
) -> None:
    sim = servers.start(lambda: create_sim_app(time_scale=20.0))
    meter = SwitchableMeter(sim)
    proxy = start_proxy(sim, meter={"kind": "simulated", "interval_ms": 20}, meters={"up": meter})
    model = httpx.get(f"{sim}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 20}

    def health() -> dict:
        return httpx.get(f"{proxy}/scer/health").json()

    ok = httpx.post(f"{proxy}/v1/chat/completions", json=body)
    assert ok.status_code == 200 and float(ok.headers["x-scer-energy-j"]) > 0

    meter.broken = True
    _wait(lambda: health()["status"] == "degraded")
    during = httpx.post(f"{proxy}/v1/chat/completions", json=body)
    assert during.status_code == 200  # served all the same
    rid = during.headers["x-scer-request-id"]
    assert "meter_error" in httpx.get(f"{proxy}/scer/requests/{rid}").json()["flags"]
    assert health()["meter"]["errors"] > 0

    meter.broken = False
    _wait(lambda: health()["status"] == "ok")
    # The request served during the outage settles once readings come back.
    _wait(lambda: httpx.get(f"{proxy}/scer/requests/{rid}").json()["settled"])
    record = httpx.get(f"{proxy}/scer/requests/{rid}").json()
    assert record["energy_j"] > 0 and "meter_error" in record["flags"]

    # A counter reset (driver reload): the counter drops; nothing negative is attributed, and it goes on.
    counted_j = health()["meter"]["upstreams"][0]["counter_j"]
    meter.offset_j = 1e9
    after = httpx.post(f"{proxy}/v1/chat/completions", json=body)
    assert after.status_code == 200
    rid = after.headers["x-scer-request-id"]
    _wait(lambda: httpx.get(f"{proxy}/scer/requests/{rid}").json()["settled"])
    summary = httpx.get(f"{proxy}/scer/summary").json()
    records = httpx.get(f"{proxy}/scer/requests?limit=10").json()["data"]
    assert all(r["energy_j"] is not None and r["energy_j"] >= 0 for r in records)
    assert summary["totals"]["energy_j"] > 0
    # No figure anywhere goes negative: health's counter goes on from where it was, one interval lost.
    (upstream,) = health()["meter"]["upstreams"]
    assert upstream["counter_resets"] >= 1
    assert upstream["counter_j"] >= counted_j > 0 and upstream["measured_j"] > 0
    assert upstream["measured_j"] <= upstream["counter_j"] * (1 + 1e-9)
