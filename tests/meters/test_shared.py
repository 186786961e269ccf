"""Upstreams on one board share one meter and one timeline: its energy is split among all their requests
by one rule and counted once (attributed + idle = the counter), each record keeps its own upstream; and
the grouping itself: an index and a UUID of one board, MIG devices of one board, overlapping GPU sets."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from aiohttp import web

from scer_proxy.config import UpstreamConfig
from scer_proxy.meters.dcgm import DcgmMeter, parse_energy_mj
from scer_proxy.meters.nvml import NvmlMeter
from scer_proxy.meters.select import Choice, connected, share_hardware
from scer_proxy.sim import SIM_STATE, Engine, create_sim_app, get_profile
from tests.conftest import proxy_config
from tests.fake_pynvml import FakeNvml
from tests.servers import ThreadedServers

BOARD_UUID = "GPU-5ca1ab1e-0000-4000-8000-000000000000"


class OneBoardExporter:
    """A DCGM page with one GPU whose counter is what two simulated servers on it draw together (their
    engines' counters summed): two inference servers sharing one board. Runs on the servers' loop beside
    the simulators and reads their engines directly; ``freeze`` stops the page where it is."""

    def __init__(self, sims: list[web.Application]) -> None:
        self.sims = sims
        self.frozen: str | None = None

    def page(self) -> str:
        total_j = 0.0
        for sim in self.sims:
            engine = sim[SIM_STATE].engine
            engine.sync()
            total_j += engine.published.energy_j
        value_mj = 7_000_000_000 + int(total_j * 1000.0)
        return (
            "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n"
            f'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{gpu="0",UUID="{BOARD_UUID}",'
            f'modelName="NVIDIA H100 80GB HBM3",Hostname="gpu-node"}} {value_mj}\n'
        )

    def app(self) -> web.Application:
        async def metrics(request: web.Request) -> web.Response:
            return web.Response(text=self.frozen if self.frozen is not None else self.page())

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        return app

    def freeze(self, servers: ThreadedServers) -> float:
        async def page() -> str:
            return self.page()

        self.frozen = servers.call(page())
        return sum(s.value_mj for s in parse_energy_mj(self.frozen)) / 1000.0


def _wait(predicate: Callable[[], bool], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.mark.parametrize("idle", ["separate", "amortize"])
def test_two_upstreams_on_one_gpu_split_its_counter_once(
    servers: ThreadedServers, start_proxy: Callable[..., str], idle: str
) -> None:
    apps: list[web.Application] = []

    def make(profile: str) -> Callable[[], web.Application]:
        def build() -> web.Application:
            apps.append(create_sim_app(get_profile(profile), time_scale=20.0))
            return apps[-1]

        return build

    sim_a = servers.start(make("llama-3.1-8b-h100"), handler_cancellation=True)
    sim_b = servers.start(make("gemma-3-12b-it-h100"), handler_cancellation=True)
    exporter = OneBoardExporter(apps)
    exporter_url = servers.start(exporter.app)
    first_j = exporter.freeze(servers)
    model_a = httpx.get(f"{sim_a}/v1/models").json()["data"][0]["id"]
    model_b = httpx.get(f"{sim_b}/v1/models").json()["data"][0]["id"]
    config = proxy_config(
        sim_a,
        meter={"kind": "dcgm", "dcgm_url": exporter_url + "/metrics", "interval_ms": 20},
        attribution={"idle": idle},
    )
    # One by the board's index, one by its UUID: the same GPU.
    upstreams = (
        UpstreamConfig(name="a", url=sim_a, models=(model_a,), gpus=(0,)),
        UpstreamConfig(name="b", url=sim_b, models=(model_b,), gpus=(BOARD_UUID,)),
    )
    proxy = start_proxy(config=dataclasses.replace(config, upstreams=upstreams))

    def one(i: int) -> str:
        body = {
            "model": model_a if i % 2 else model_b,
            "messages": [{"role": "user", "content": f"the lake {i} " * (2 + i % 7)}],
            "max_tokens": 20 + 7 * (i % 4),
            "stream": i % 3 == 0,
        }
        resp = httpx.post(f"{proxy}/v1/chat/completions", json=body, timeout=30)
        assert resp.status_code == 200
        return resp.headers["X-SCER-Request-Id"]

    with httpx.Client(base_url=proxy, timeout=30) as http:
        _wait(
            lambda: (
                http.get("/scer/health").json()["meter"]["upstreams"][0]["last_reading_age_ms"] is not None
            )
        )
        time.sleep(0.1)
        exporter.frozen = None
        with ThreadPoolExecutor(4) as pool:
            ids = list(pool.map(one, range(24)))
        time.sleep(0.2)  # some idle time on the board
        _wait(lambda: http.get("/scer/health").json()["ledger"]["pending_settlement"] == 0)
        last_j = exporter.freeze(servers)
        time.sleep(0.2)
        _wait(lambda: http.get("/scer/health").json()["meter"]["upstreams"][0]["deferred_intervals"] == 0)
        health = http.get("/scer/health").json()
        summary = http.get("/scer/summary").json()
        records = http.get("/scer/requests?limit=100").json()["data"]

    assert sorted(r["request_id"] for r in records) == sorted(ids)
    counter_j = last_j - first_j
    attributed_j = sum(r["energy_j"] for r in records)
    assert (attributed_j + summary["idle_energy_j"]) / counter_j == pytest.approx(1.0, rel=1e-3)
    (meter,) = health["meter"]["upstreams"]  # one meter for the board, named by both upstreams
    assert meter["shared_by"] == ["a", "b"] and meter["errors"] == 0
    assert "shared by a, b" in meter["note"]
    assert meter["measured_j"] == pytest.approx(counter_j, rel=1e-9)
    by_upstream = {name: [r for r in records if r["upstream"] == name] for name in ("a", "b")}
    assert {r["model"] for r in by_upstream["a"]} == {model_a} and {r["model"] for r in by_upstream["b"]} == {
        model_b
    }
    for name, own in by_upstream.items():
        assert len(own) == 12 and all(r["settled"] and r["energy_j"] > 0 for r in own), name
    metrics = httpx.get(f"{proxy}/metrics").text
    assert re.search(r'scer_meter_healthy\{upstream="a"\} 1\.0', metrics)
    assert re.search(r'scer_meter_healthy\{upstream="b"\} 1\.0', metrics)


def test_connected_groups_overlapping_sets_transitively() -> None:
    keys = {
        "a": frozenset({"gpu:0", "gpu:1"}),
        "b": frozenset({"gpu:2"}),
        "c": frozenset({"gpu:1", "gpu:3"}),
        "d": frozenset({"gpu:3", "gpu:2"}),
        "e": frozenset({"gpu:9"}),
    }
    assert connected(keys) == [("a", "b", "c", "d"), ("e",)]
    assert connected({"x": frozenset({"k"}), "y": frozenset({"l"})}) == [("x",), ("y",)]


def _page(gpus: int) -> str:
    return "".join(
        f'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{gpu="{i}",UUID="GPU-{i}"}} {1000 * (i + 1)}\n'
        for i in range(gpus)
    )


async def test_overlapping_gpu_sets_merge_into_one_meter_over_their_union(servers: ThreadedServers) -> None:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=_page(4))

    def make() -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", metrics)
        return app

    url = servers.start(make) + "/metrics"
    choices = {
        "a": Choice(DcgmMeter(url, gpus=[0, 1]), None, "configured: DCGM exporter"),
        "b": Choice(DcgmMeter(url, gpus=["GPU-2", 1]), None, "configured: DCGM exporter"),
        "c": Choice(DcgmMeter(url, gpus=[3]), None, "configured: DCGM exporter"),
        "d": Choice(None, None, "none"),
    }
    groups = await share_hardware(choices)
    assert [g.names for g in groups] == [("a", "b"), ("c",), ("d",)]
    merged = groups[0].choice.meter
    assert isinstance(merged, DcgmMeter) and merged is not choices["a"].meter
    reading = await merged.read()
    assert reading.devices_j == {"0": 1.0, "1": 2.0, "2": 3.0}  # GPU 1 once
    assert groups[1].choice.meter is choices["c"].meter
    for group in groups:
        if group.choice.meter is not None:
            await group.choice.meter.close()


async def test_mig_devices_of_one_board_share_one_nvml_meter() -> None:
    clock = [1000.0]

    async def sleep(dt_s: float) -> None:
        clock[0] += dt_s

    engine = Engine(get_profile("llama-3.1-70b-h100x4"), clock=lambda: clock[0])
    fake = FakeNvml(engine, mig=True, mig_devices=2)
    mig_a, mig_b = [u for u, h in fake.mig_uuids.items() if h.parent == 2]

    def nvml(gpus: list[Any]) -> NvmlMeter:
        return NvmlMeter(gpus, clock=lambda: clock[0], nvml=fake, sleep=sleep)

    choices = {
        "a": Choice(nvml([mig_a]), None, "configured: NVML"),
        "b": Choice(nvml([mig_b]), None, "configured: NVML"),
        "c": Choice(nvml([0]), None, "configured: NVML"),
    }
    groups = await share_hardware(choices)
    assert [g.names for g in groups] == [("a", "b"), ("c",)]
    assert groups[0].choice.meter is choices["a"].meter  # the same board: the first meter is kept
    assert "shared by a, b" in groups[0].choice.note
    for group in groups:
        assert group.choice.meter is not None
        await group.choice.meter.close()
