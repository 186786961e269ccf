"""``report --prometheus`` against a real Prometheus (the Debian ``prometheus`` package, 2.42) scraping a real
proxy in front of the simulator every second: over a window, it equals the ledger's figure within 5 %.

Prometheus's ``increase()`` extrapolates to the window's edges by up to a scrape interval each side, so
the window is a minute for a scrape every second (at most about 3 % from that). The series compared
existed before the window (a warm-up request made them); a model first seen inside the window is
named by the report as having begun there.

A retention pass runs inside the window, after the traffic, and deletes the warm-up's records: counters
re-summed from the ledger at each scrape went down then, which Prometheus reads as a reset and ``increase()`` counts again
in full (the report doubled); the in-process counters never go down.

Without the ``prometheus`` binary the test is skipped locally and fails under CI (``$CI`` set), as the
llama.cpp tests do: ``.ci/run`` installs the package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from scer_proxy.app import create_app
from scer_proxy.proxy.serving import free_port
from scer_proxy.sim import create_sim_app
from scer_proxy.sim.profiles import get_profile
from scer_proxy.web.keys import LEDGER
from tests.conftest import proxy_config
from tests.servers import ThreadedServers
from tests.summary.test_report_prometheus import by_model, report, report_json

PROFILE = get_profile("llama-3.1-8b-h100")
MODEL = PROFILE.model_id
LATE = "a-model-first-seen-in-the-window"  # the simulator refuses it: an upstream_error record
WINDOW_S = 60.0
TRAFFIC_S = 20.0
RETENTION_AT_S = 30.0  # into the window, after the traffic: nothing it deletes is masked by new counts
RETENTION_S = 28.5  # deletes what started before 1.5 s into the window: the warm-up only
COMPARED = ("requests", "prompt_tokens", "completion_tokens", "energy_j", "carbon_g")


def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI: the prometheus binary is missing (.ci/run installs the Debian package)")
        pytest.skip("no prometheus binary (apt-get install prometheus)")
    return found


@pytest.fixture
def prometheus_and_proxy(tmp_path: Path) -> Iterator[tuple[str, str, ThreadedServers, web.Application]]:
    binary = prometheus_binary()
    servers = ThreadedServers()
    proc: subprocess.Popen[bytes] | None = None
    try:
        sim = servers.start(lambda: create_sim_app(PROFILE, time_scale=50.0), handler_cancellation=True)
        config = proxy_config(sim, storage={"path": ":memory:", "retention_days": RETENTION_S / 86400})
        made: list[web.Application] = []

        def make() -> web.Application:
            made.append(create_app(config))
            return made[0]

        proxy = servers.start(make, handler_cancellation=True)
        # The first retention pass now, before any record: the next is an hour away, so the one pass
        # that deletes anything is the test's own.
        servers.call(made[0][LEDGER]._writer._retention())
        scrape = tmp_path / "prometheus.yml"
        scrape.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: scer\n    static_configs:\n"
            f"      - targets: ['{proxy.removeprefix('http://')}']\n"
        )
        port = free_port()
        with (tmp_path / "prometheus.log").open("wb") as log:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={scrape}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not get ready"
            time.sleep(0.1)
        yield url, proxy, servers, made[0]
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        servers.close()


def chat(http: httpx.Client, model: str, i: int, *, stream: bool = False) -> int:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"question {i}"}],
        "max_tokens": 8 + (i % 5) * 6,
        "stream": stream,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.read()
        return resp.status_code


def settle(proxy: str) -> None:
    deadline = time.monotonic() + 20
    while True:
        totals = httpx.get(f"{proxy}/scer/summary").json()["totals"]
        if totals["settled_requests"] == totals["metered_requests"]:
            return
        assert time.monotonic() < deadline, totals
        time.sleep(0.05)


def scraped_requests(prometheus: str) -> float:
    body = httpx.get(f"{prometheus}/api/v1/query", params={"query": "sum(scer_requests_total)"}).json()
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else 0.0


def test_report_from_a_real_prometheus_equals_the_ledger(
    prometheus_and_proxy: tuple[str, str, ThreadedServers, web.Application],
    capsys: pytest.CaptureFixture[str],
) -> None:
    prometheus, proxy, servers, app = prometheus_and_proxy
    with httpx.Client(base_url=proxy, timeout=30) as http:
        # Warm-up: the series exist, and are scraped, before the window opens.
        for i in range(3):
            assert chat(http, MODEL, i) == 200
        settle(proxy)
        deadline = time.monotonic() + 20
        while scraped_requests(prometheus) < 3:
            assert time.monotonic() < deadline, "prometheus never scraped the proxy"
            time.sleep(0.2)
        time.sleep(3.0)
        opened = time.time()
        # increase() sees a change from the window's first scrape on (what comes between the window's
        # start and that scrape is only extrapolated): the traffic starts two scrapes into the window.
        time.sleep(3.0)
        # Traffic for about 20 s, two at a time, some streamed; and a model first seen inside the window.
        stop = time.monotonic() + TRAFFIC_S
        count = iter(range(1 << 30))

        def worker(_: int) -> int:
            sent = 0
            while time.monotonic() < stop:
                i = next(count)
                assert chat(http, MODEL, i, stream=i % 3 == 0) == 200
                sent += 1
                time.sleep(0.05)
            return sent

        with ThreadPoolExecutor(2) as pool:
            sent = sum(pool.map(worker, range(2)))
        for i in range(2):
            assert chat(http, LATE, i) == 404
    settle(proxy)
    time.sleep(max(0.0, opened + RETENTION_AT_S - time.time()))
    ledger = app[LEDGER]
    assert servers.call(ledger.flush())
    servers.call(ledger._writer._retention())  # the warm-up's records go, the window's stay
    assert sent >= 20
    time.sleep(max(0.0, opened + WINDOW_S + 0.5 - time.time()))  # the window: after the warm-up

    scraped = report_json(["--prometheus", prometheus, "--since", "1m"], capsys)
    ledger = report_json(["--proxy", proxy, "--since", "1m"], capsys)
    got, want = by_model(scraped)[MODEL], by_model(ledger)[MODEL]
    assert want["requests"] == sent
    everything = by_model(report_json(["--proxy", proxy], capsys))[MODEL]
    assert everything["requests"] == sent  # the warm-up's 3 records are gone from the ledger
    with capsys.disabled():
        print(
            f"\nreport --prometheus --since 1m against the ledger: {got['requests']} / {want['requests']} "
            f"requests, {got['energy_j']:.0f} / {want['energy_j']:.0f} J, {got['carbon_g']:.4f} / "
            f"{want['carbon_g']:.4f} g"
        )
    for key in COMPARED:
        assert got[key] == pytest.approx(want[key], rel=0.05), (key, got[key], want[key])
    # The model first seen inside the window: the report says its series began there.
    began = {entry["model"]: entry["began_at"] for entry in scraped["series_began"]}
    assert set(began) == {LATE} and opened < began[LATE] < time.time()
    assert scraped["window"]["end"] - scraped["window"]["start"] == pytest.approx(WINDOW_S)
    code, out, err = report(["--prometheus", prometheus, "--since", "1m"], capsys)
    assert code == 0, err
    assert f"note: a series of {LATE} began inside the window at " in out
