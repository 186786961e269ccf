"""``GET /metrics`` through a real proxy: counters that only go up (polled every 10 ms through traffic,
settlements and a retention pass), the series beside them, and model labels bounded under junk names."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from scer_proxy import __version__
from scer_proxy import app as app_module
from scer_proxy.carbon.records import Record
from scer_proxy.config import Config, UpstreamConfig
from scer_proxy.sim import create_sim_app
from scer_proxy.sim.profiles import get_profile
from scer_proxy.summary.metrics import ENERGY_BUCKETS_J, OTHER_MODEL
from scer_proxy.web.keys import LEDGER
from tests.conftest import proxy_config
from tests.servers import ThreadedServers

PROFILE = get_profile("llama-3.1-8b-h100")
MODEL = PROFILE.model_id

Sample = tuple[str, tuple[tuple[str, str], ...]]  # sample name, sorted labels


def samples(text: str) -> dict[Sample, float]:
    """Every sample of a /metrics text, by name and labels."""
    out: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def monotonic(name: str) -> bool:
    """Samples that must never decrease: counters and the histogram's buckets, count and sum."""
    return name.endswith(("_total", "_bucket", "_count", "_sum"))


class Poller:
    """GETs ``/metrics`` every 10 ms on a thread; records every counter sample that went down."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.polls = 0
        self.decreases: list[tuple[Sample, float, float]] = []
        self.last: dict[Sample, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as http:
            while not self._stop.is_set():
                now = samples(http.get(f"{self.url}/metrics").text)
                for key, before in self.last.items():
                    value = now.get(key, 0.0)  # a counter series that vanishes is a reset to zero
                    if monotonic(key[0]) and value < before:
                        self.decreases.append((key, before, value))
                self.last = {k: max(v, self.last.get(k, v)) for k, v in now.items()} | {
                    k: v for k, v in self.last.items() if k not in now
                }
                self.polls += 1
                time.sleep(0.01)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


@dataclasses.dataclass
class Proxy:
    servers: ThreadedServers
    app: web.Application
    url: str


def start(servers: ThreadedServers, config: Config) -> Proxy:
    made: list[web.Application] = []

    def make() -> web.Application:
        made.append(app_module.create_app(config))
        return made[0]

    url = servers.start(make, handler_cancellation=True)
    return Proxy(servers, made[0], url)


@pytest.fixture
def sim_proxy(servers: ThreadedServers) -> Proxy:
    sim = servers.start(lambda: create_sim_app(PROFILE, time_scale=50.0), handler_cancellation=True)
    # Records older than about 0.09 s go at a retention pass (the test runs one when it wants).
    proxy = start(servers, proxy_config(sim, storage={"path": ":memory:", "retention_days": 1e-6}))
    no_retention_until_asked(proxy)
    return proxy


def no_retention_until_asked(proxy: Proxy) -> None:
    """Run the ledger's first retention pass now, before any record: the next is an hour away (its first
    would otherwise run after the first flush that leaves nothing pending, under traffic at any time)."""
    proxy.servers.call(proxy.app[LEDGER]._writer._retention())


def chat(http: httpx.Client, model: str, i: int, *, stream: bool = False) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"question {i}"}],
        "max_tokens": 4 + (i % 7) * 5,
        "stream": stream,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.read()
        assert resp.status_code == 200, resp.text


def wait_settled(url: str, requests: int) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        summary: dict[str, Any] = httpx.get(f"{url}/scer/summary").json()
        totals = summary["totals"]
        if totals["requests"] == totals["settled_requests"] == requests:
            return summary
        assert time.monotonic() < deadline, totals
        time.sleep(0.05)


def test_counters_never_decrease_through_traffic_settlement_and_retention(sim_proxy: Proxy) -> None:
    """Before, the counters were the ledger's sums re-read at each scrape: a settlement that lowered a
    response-time figure, and retention, lowered them (22 decreases in 30 requests were seen)."""
    n = 40
    with Poller(sim_proxy.url) as poller:
        with httpx.Client(base_url=sim_proxy.url, timeout=30) as http, ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: chat(http, MODEL, i, stream=i % 3 == 0), range(n)))
        summary = wait_settled(sim_proxy.url, n)
        time.sleep(0.2)
        counted = samples(httpx.get(f"{sim_proxy.url}/metrics").text)
        # A retention pass deletes every record (they are all older than retention_days).
        ledger = sim_proxy.app[LEDGER]
        assert sim_proxy.servers.call(ledger.flush())
        sim_proxy.servers.call(ledger._writer._retention())
        after = httpx.get(f"{sim_proxy.url}/scer/summary").json()
        assert after["totals"]["requests"] == 0 and len(ledger) == 0  # the ledger did lose them
        time.sleep(0.3)
    assert poller.polls > 20
    assert poller.decreases == [], poller.decreases[:5]
    # The counters hold every settled figure, once, and retention took nothing from them.
    final = samples(httpx.get(f"{sim_proxy.url}/metrics").text)
    labels = (("model", MODEL), ("status", "ok"), ("upstream", "up"))
    assert counted[("scer_requests_total", labels)] == final[("scer_requests_total", labels)] == n
    energy = sum(v for (name, _), v in final.items() if name == "scer_energy_joules_total")
    assert energy == pytest.approx(summary["totals"]["energy_j"], rel=1e-9)
    carbon = sum(v for (name, _), v in final.items() if name == "scer_carbon_grams_total")
    assert carbon == pytest.approx(summary["totals"]["carbon_g"], rel=1e-9)
    completion = final[("scer_tokens_total", (("kind", "completion"), ("model", MODEL), ("upstream", "up")))]
    assert completion == summary["totals"]["completion_tokens"]
    # Nothing waits for the meter any more.
    assert final[("scer_unsettled_requests", (("upstream", "up"),))] == 0


def test_the_series_beside_the_counters(sim_proxy: Proxy) -> None:
    """The upstream label, the energy histogram, the measured and idle energy counters, the grid
    intensity gauge and the build info."""
    with httpx.Client(base_url=sim_proxy.url, timeout=30) as http:
        for i in range(6):
            chat(http, MODEL, i)
    summary = wait_settled(sim_proxy.url, 6)
    time.sleep(0.3)  # a few meter readings of idle after the requests
    got = samples(httpx.get(f"{sim_proxy.url}/metrics").text)
    health = httpx.get(f"{sim_proxy.url}/scer/health").json()
    up = ("upstream", "up")
    per_request = (("model", MODEL), up)
    # The histogram of energy per request: every request in +Inf, the sum their energy, log buckets.
    assert got[("scer_request_energy_joules_count", per_request)] == 6
    assert got[("scer_request_energy_joules_sum", per_request)] == pytest.approx(
        summary["totals"]["energy_j"], rel=1e-9
    )
    buckets = sorted(
        (float(dict(k[1])["le"]), v) for k, v in got.items() if k[0] == "scer_request_energy_joules_bucket"
    )
    assert [b for b, _ in buckets] == [*ENERGY_BUCKETS_J, float("inf")]
    assert [v for _, v in buckets] == sorted(v for _, v in buckets) and buckets[-1][1] == 6
    # What the meter counted (before PUE) and the idle energy, as counters; the idle balance a gauge.
    measured = got[("scer_measured_energy_joules_total", (up,))]
    assert measured > 0 and measured <= health["meter"]["upstreams"][0]["measured_j"] + 1e-6
    idle = got[("scer_idle_energy_joules_total", (up,))]
    spread = got[("scer_idle_spread_joules_total", (up,))]
    assert 0 < idle <= measured * (1 + 1e-9) and 0 <= spread <= idle
    assert got[("scer_idle_balance_joules", (up,))] == pytest.approx(idle - spread, abs=1e-6)
    assert got[("scer_meter_healthy", (up,))] == 1
    grid = summary["grid"]
    assert got[("scer_grid_intensity_grams_per_kwh", (("source", grid["source"]),))] == pytest.approx(
        grid["intensity_g_per_kwh"]
    )
    assert got[("scer_build_info", (("version", __version__),))] == 1
    # Each counter series says when it began.
    assert ("scer_requests_created", (("model", MODEL), ("status", "ok"), up)) in got


def _record(i: int, model: str) -> Record:
    return Record(
        request_id=f"scer-junk-{i:08d}",
        model=model,
        upstream="up",
        tenant="t",
        endpoint="chat",
        stream=False,
        started_at=time.time(),
        ended_at=time.time(),
        status="ok",
        prompt_tokens=3,
        completion_tokens=2,
        energy_j=1.5,
        energy_source="simulated",
        hardware_s=0.01,
        carbon_g=0.001,
        carbon_operational_g=0.0009,
        carbon_embodied_g=0.0001,
        settled=True,
    )


def test_model_labels_are_bounded_over_http(servers: ThreadedServers, fake_upstream: str) -> None:
    """Junk model names through the proxy: beyond ``metrics.max_models`` they count as ``other``; a model
    the configuration names keeps its own label even then; the ledger keeps every real name."""
    config = dataclasses.replace(
        proxy_config(fake_upstream, metrics={"max_models": 5}),
        upstreams=(UpstreamConfig(name="up", url=fake_upstream, models=("named-model", "*")),),
    )
    proxy = start(servers, config)
    junk = [f"junk-{i}" for i in range(30)]
    with httpx.Client(base_url=proxy.url, timeout=30) as http:
        for i, model in enumerate([*junk, "named-model"]):
            chat(http, model, i)
    got = samples(httpx.get(f"{proxy.url}/metrics").text)
    requests = {dict(k[1])["model"]: v for k, v in got.items() if k[0] == "scer_requests_total"}
    assert requests == {**dict.fromkeys(junk[:5], 1.0), OTHER_MODEL: 25.0, "named-model": 1.0}
    ledger_models = {m["model"] for m in httpx.get(f"{proxy.url}/scer/summary").json()["models"]}
    assert ledger_models == {*junk, "named-model"}


@pytest.fixture
def junk_proxy(servers: ThreadedServers, fake_upstream: str) -> Iterator[Proxy]:
    yield start(servers, proxy_config(fake_upstream))


def test_twenty_thousand_junk_names_keep_metrics_small(junk_proxy: Proxy) -> None:
    """20,000 model names (a client sending random ones): before, 13.5 MB of /metrics made on each
    scrape in 3 to 4.5 s; now the default cap of 100 names plus ``other``."""
    n = 20_000

    async def put_all() -> None:
        ledger = junk_proxy.app[LEDGER]
        for i in range(n):
            ledger.put(_record(i, f"junk-{i}-{'x' * 20}"))
        assert await ledger.flush()

    junk_proxy.servers.call(put_all(), timeout=120)
    t0 = time.perf_counter()
    resp = httpx.get(f"{junk_proxy.url}/metrics", timeout=60)
    took_s = time.perf_counter() - t0
    assert resp.status_code == 200
    got = samples(resp.text)
    models = {dict(k[1]).get("model") for k in got} - {None}
    assert len(models) == 101 and OTHER_MODEL in models
    other = (("model", OTHER_MODEL), ("status", "ok"), ("upstream", "up"))
    assert got[("scer_requests_total", other)] == n - 100
    assert sum(v for k, v in got.items() if k[0] == "scer_requests_total") == n
    assert len(got) < 4000 and len(resp.content) < 1_000_000, (len(got), len(resp.content))
    assert took_s < 5.0  # generous: a busy machine's noise, not a measure of speed
    # The ledger keeps every real name.
    summary = httpx.get(f"{junk_proxy.url}/scer/summary", timeout=60).json()
    assert len(summary["models"]) == n and summary["totals"]["requests"] == n
