"""``scer-proxy report --prometheus``: real proxies in front of real simulators, scraped by a fake Prometheus.

The fake Prometheus is a real HTTP server: it scrapes the proxies' real ``/metrics`` text on demand and
evaluates exactly the query shapes ``report`` sends (``sum``/``min``/``max``, optionally ``by (labels)``, of a
selector with ``=``/``!=`` matchers, optionally inside ``increase(...[range])`` answered from two scrapes,
without Prometheus's extrapolation). Any other query gets a Prometheus-style ``bad_data`` error.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import re
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import httpx
import orjson
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from scer_proxy.app import create_app
from scer_proxy.carbon.totals import TOTALS
from scer_proxy.cli.report import add_report_arguments, main_report
from scer_proxy.config import UpstreamConfig
from scer_proxy.proxy.serving import free_port
from scer_proxy.sim import create_sim_app
from scer_proxy.sim.profiles import get_profile
from scer_proxy.summary import promql
from tests.conftest import proxy_config
from tests.servers import ThreadedServers

LLAMA = get_profile("llama-3.1-8b-h100").model_id
QWEN = get_profile("qwen3-14b-h100").model_id
COMPARED = TOTALS[: TOTALS.index("metered_requests")]  # the figures the metrics carry
ADDITIVE = COMPARED[: COMPARED.index("energy_j_per_1k_output_tokens")]  # sums, not ratios
CSV_COMPARED = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "energy_wh",
    "carbon_g",
    "carbon_g_per_1k_output_tokens",
)

# ---------------------------------------------------------------- the fake Prometheus

_AGGREGATE = re.compile(r"^(sum|min|max)(?: by \((\w+(?:, \w+)*)\) )?\((.+)\)$")
_INCREASE = re.compile(r"^increase\((.+)\[(\d+)(ms|s|m|h|d)\]\)$")
_SELECTOR = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.+)\})?$")
_MATCHER = re.compile(r'(\w+)(=|!=)"((?:[^"\\]|\\.)*)"(?:,|$)')
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}

Series = tuple[str, dict[str, str], float]  # sample name, labels, value


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m.group(1), m.group(1)), text)


def _matchers(text: str | None) -> list[tuple[str, str, str]]:
    found: list[tuple[str, str, str]] = []
    pos = 0
    while text and pos < len(text):
        match = _MATCHER.match(text, pos)
        if match is None:
            raise ValueError(f"parse error: unexpected {text[pos:]!r} in label matchers")
        found.append((match.group(1), match.group(2), _unescape(match.group(3))))
        pos = match.end()
    return found


class FakePrometheus:
    """Scrapes ``targets`` (URL, instance label) when asked; serves ``GET /api/v1/query``."""

    def __init__(self, targets: list[tuple[str, str]]) -> None:
        self.targets = targets
        self.scrapes: list[tuple[float, list[Series]]] = []
        self.queries: list[str] = []
        self.rejected: list[str] = []
        self.app = web.Application()
        self.app.router.add_get("/api/v1/query", self._query)

    async def scrape(self) -> None:
        samples: list[Series] = []
        async with aiohttp.ClientSession() as session:
            for url, instance in self.targets:
                async with session.get(url + "/metrics") as resp:
                    assert resp.status == 200
                    text = await resp.text()
                for family in text_string_to_metric_families(text):
                    for s in family.samples:
                        samples.append((s.name, {**s.labels, "instance": instance, "job": "scer"}, s.value))
        self.scrapes.append((time.time(), samples))

    def _select(self, selector: str, samples: list[Series]) -> dict[tuple[tuple[str, str], ...], Series]:
        match = _SELECTOR.match(selector)
        if match is None:
            raise ValueError(f"parse error: not a selector: {selector!r}")
        name, matchers = match.group(1), _matchers(match.group(2))
        return {
            tuple(sorted(labels.items())): (n, labels, v)
            for n, labels, v in samples
            if n == name and all((labels.get(k, "") == v) == (op == "=") for k, op, v in matchers)
        }

    def _inner(self, expr: str) -> list[Series]:
        if not self.scrapes:
            return []
        end, latest = self.scrapes[-1]
        increase = _INCREASE.match(expr)
        if increase is None:
            return list(self._select(expr, latest).values())
        window_s = int(increase.group(2)) * _UNIT_S[increase.group(3)]
        earlier = [s for t, s in self.scrapes[:-1] if t >= end - window_s]
        if not earlier:
            return []  # fewer than two samples in the range
        before = self._select(increase.group(1), earlier[0])
        out = []
        for key, (n, labels, v) in self._select(increase.group(1), latest).items():
            if key in before:
                v0 = before[key][2]
                out.append((n, labels, v - v0 if v >= v0 else v))  # a decrease is a counter reset
        return out

    def evaluate(self, query: str) -> list[dict[str, Any]]:
        match = _AGGREGATE.match(query)
        if match is None:
            raise ValueError(f"parse error: unsupported query {query!r}")
        op, by, inner = (
            match.group(1),
            (match.group(2) or "").split(", ") if match.group(2) else [],
            match.group(3),
        )
        groups: dict[tuple[str, ...], list[float]] = {}
        for _, labels, value in self._inner(inner):
            groups.setdefault(tuple(labels.get(k, "") for k in by), []).append(value)
        at = self.scrapes[-1][0] if self.scrapes else time.time()
        return [
            {
                "metric": {k: v for k, v in zip(by, key, strict=True) if v},
                "value": [at, repr({"sum": sum, "min": min, "max": max}[op](values))],
            }
            for key, values in sorted(groups.items())
        ]

    async def _query(self, request: web.Request) -> web.Response:
        query = request.query.get("query", "")
        self.queries.append(query)
        try:
            result = self.evaluate(query)
        except ValueError as exc:
            self.rejected.append(query)
            return web.json_response(
                {"status": "error", "errorType": "bad_data", "error": str(exc)}, status=400
            )
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": result}})


# ---------------------------------------------------------------- the fleet: two proxies, two simulators


@dataclasses.dataclass
class Fleet:
    servers: ThreadedServers
    http: httpx.Client
    proxy_a: str  # routes LLAMA and QWEN to their own simulators
    proxy_b: str  # LLAMA only (the same simulator)

    def send(self, proxy: str, model: str, n: int, *, stream: bool = False) -> None:
        for i in range(n):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"question {i} for {model}"}],
                "max_tokens": 6 + 3 * i,
                "stream": stream,
            }
            resp = self.http.post(f"{proxy}/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text

    def settle(self, *proxies: str) -> None:
        """Wait until every metered request's energy is final (settled after the next meter reading)."""
        deadline = time.monotonic() + 15
        for proxy in proxies:
            while True:
                totals = self.http.get(f"{proxy}/scer/summary").json()["totals"]
                if totals["settled_requests"] == totals["metered_requests"] == totals["requests"]:
                    break
                assert time.monotonic() < deadline, totals
                time.sleep(0.05)

    def prometheus(self, *targets: tuple[str, str]) -> tuple[FakePrometheus, str]:
        fake = FakePrometheus(list(targets))
        url = self.servers.start(lambda: fake.app)
        self.servers.call(fake.scrape())
        return fake, url


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    servers = ThreadedServers()
    http = httpx.Client(timeout=30.0)
    try:
        sim_llama = servers.start(lambda: create_sim_app(get_profile("llama-3.1-8b-h100"), time_scale=50.0))
        sim_qwen = servers.start(lambda: create_sim_app(get_profile("qwen3-14b-h100"), time_scale=50.0))
        both = dataclasses.replace(
            proxy_config(sim_llama),
            upstreams=(
                UpstreamConfig(name="llama", url=sim_llama, models=(LLAMA,)),
                UpstreamConfig(name="qwen", url=sim_qwen, models=(QWEN,)),
            ),
        )
        proxy_a = servers.start(lambda: create_app(both), handler_cancellation=True)
        proxy_b = servers.start(lambda: create_app(proxy_config(sim_llama)), handler_cancellation=True)
        fleet = Fleet(servers, http, proxy_a, proxy_b)
        fleet.send(proxy_a, LLAMA, 3)
        fleet.send(proxy_a, QWEN, 2)
        fleet.send(proxy_a, QWEN, 1, stream=True)
        fleet.send(proxy_b, LLAMA, 2)
        fleet.settle(proxy_a, proxy_b)
        yield fleet
    finally:
        http.close()
        servers.close()


def report(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    add_report_arguments(parser)
    capsys.readouterr()  # drop the servers' log lines printed so far
    code = main_report(parser.parse_args(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def report_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, err = report([*argv, "--format", "json"], capsys)
    assert code == 0, err
    summary: dict[str, Any] = orjson.loads(out)
    return summary


def by_model(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["model"]: m for m in summary["models"]}


def assert_same(got: dict[str, Any], want: dict[str, Any], keys: tuple[str, ...] = COMPARED) -> None:
    for key in keys:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


# ---------------------------------------------------------------- tests


def test_prometheus_matches_the_proxy_in_json_and_csv(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    fake, prom = fleet.prometheus((fleet.proxy_a, "a"))
    direct = report_json(["--proxy", fleet.proxy_a], capsys)
    summary = report_json(["--prometheus", prom], capsys)
    assert fake.rejected == [] and len(fake.queries) == 8
    assert sorted(by_model(summary)) == sorted(by_model(direct)) == sorted([LLAMA, QWEN])
    assert by_model(summary)[LLAMA]["requests"] == 3 and by_model(summary)[QWEN]["requests"] == 3
    for name, entry in by_model(direct).items():
        assert_same(by_model(summary)[name], entry)
        assert by_model(summary)[name]["grade"] is None and by_model(summary)[name]["category"] is None
    assert_same(summary["totals"], direct["totals"])
    assert (
        summary["totals"]["metered_requests"] is None and "tenants" not in summary and "grid" not in summary
    )
    assert summary["meter"] == {"healthy": True}
    assert summary["idle_energy_j"] >= 0 and summary["series_began"] == []
    # Without a window, the figures are the counters' since they began (the first record counted, just
    # after the first request started): the window says so.
    assert 0 <= summary["window"]["start"] - direct["window"]["start"] < 10

    code, out, err = report(["--proxy", fleet.proxy_a, "--format", "csv"], capsys)
    assert code == 0, err
    want = {r["model"]: r for r in csv.DictReader(io.StringIO(out))}
    code, out, err = report(["--prometheus", prom + "/", "--format", "csv"], capsys)
    assert code == 0, err
    got = {r["model"]: r for r in csv.DictReader(io.StringIO(out))}
    assert sorted(got) == sorted(want) == sorted([LLAMA, QWEN, "total"])
    for name, row in want.items():
        for key in CSV_COMPARED:
            assert float(got[name][key]) == pytest.approx(float(row[key]), rel=1e-9), (name, key)
        assert got[name]["grade"] == ""  # no grade in the metrics: left empty, not "unrated"

    code, out, err = report(["--prometheus", prom], capsys)
    assert code == 0 and "total" in out and LLAMA in out


def test_two_scrape_targets_are_summed(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = (by_model(report_json(["--proxy", p], capsys)) for p in (fleet.proxy_a, fleet.proxy_b))
    assert sorted(b) == [LLAMA]
    _, prom = fleet.prometheus((fleet.proxy_a, "a:8080"), (fleet.proxy_b, "b:8080"))
    summed = by_model(report_json(["--prometheus", prom], capsys))
    for key in ADDITIVE:
        assert summed[LLAMA][key] == pytest.approx(a[LLAMA][key] + b[LLAMA][key], rel=1e-9), key
    assert_same(summed[QWEN], a[QWEN])

    _, twice = fleet.prometheus((fleet.proxy_a, "a:8080"), (fleet.proxy_a, "a-again:8080"))
    doubled = report_json(["--prometheus", twice], capsys)
    for name, entry in a.items():
        for key in ("requests", "prompt_tokens", "completion_tokens", "energy_j", "carbon_g"):
            assert by_model(doubled)[name][key] == pytest.approx(2 * entry[key], rel=1e-9), key
        assert by_model(doubled)[name]["sci"] == pytest.approx(entry["sci"], rel=1e-9)  # a ratio: unchanged


def test_model_filter_and_escaping(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    fake, prom = fleet.prometheus((fleet.proxy_a, "a"))
    direct = report_json(["--proxy", fleet.proxy_a, "--model", QWEN], capsys)
    summary = report_json(["--prometheus", prom, "--model", QWEN], capsys)
    assert [m["model"] for m in summary["models"]] == [QWEN]
    assert_same(summary["models"][0], direct["models"][0])
    assert_same(summary["totals"], direct["totals"])
    assert all(f'model="{QWEN}"' in q for q in fake.queries[:4])

    odd = 'we"ird\\model\n'
    empty = report_json(["--prometheus", prom, "--model", odd], capsys)
    assert empty["models"] == [] and empty["totals"]["requests"] == 0 and empty["totals"]["energy_j"] is None
    assert fake.rejected == [] and 'model="we\\"ird\\\\model\\n"' in fake.queries[-8]


def test_since_reads_increase_over_two_scrapes(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    fake, prom = fleet.prometheus((fleet.proxy_a, "a"), (fleet.proxy_b, "b"))
    before = [by_model(report_json(["--proxy", p], capsys)) for p in (fleet.proxy_a, fleet.proxy_b)]
    fleet.send(fleet.proxy_a, QWEN, 2)
    fleet.send(fleet.proxy_b, LLAMA, 1)
    fleet.settle(fleet.proxy_a, fleet.proxy_b)
    fleet.servers.call(fake.scrape())
    after = [by_model(report_json(["--proxy", p], capsys)) for p in (fleet.proxy_a, fleet.proxy_b)]

    windowed = report_json(["--prometheus", prom, "--since", "90m"], capsys)
    assert fake.rejected == [] and "increase(scer_requests_total[90m])" in fake.queries[-8]
    assert windowed["window"]["end"] - windowed["window"]["start"] == pytest.approx(5400)
    got = by_model(windowed)
    assert sorted(got) == sorted([LLAMA, QWEN]) and got[QWEN]["requests"] == 2 and got[LLAMA]["requests"] == 1
    for name in (LLAMA, QWEN):
        for key in ("requests", "prompt_tokens", "completion_tokens", "energy_j", "carbon_g"):
            want = sum(
                a[name][key] - b.get(name, {}).get(key, 0)
                for a, b in zip(after, before, strict=True)
                if name in a
            )
            assert got[name][key] == pytest.approx(want, rel=1e-6, abs=1e-9), (name, key)
    # All-time totals are unaffected by the window and cover every request.
    everything = by_model(report_json(["--prometheus", prom], capsys))
    assert everything[QWEN]["requests"] == after[0][QWEN]["requests"]


def test_tenant_needs_a_tenant_label(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    _, prom = fleet.prometheus((fleet.proxy_a, "a"))
    code, out, err = report(["--prometheus", prom, "--tenant", "acme"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("scer-proxy report: --tenant: ") and "tenant label" in err


def test_tenant_is_honoured_when_the_metrics_carry_it(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    exposition = "\n".join(
        [
            "# TYPE scer_requests counter",
            'scer_requests_total{model="m",status="ok",tenant="acme"} 3',
            'scer_requests_total{model="m",status="ok",tenant="other"} 5',
            "# TYPE scer_tokens counter",
            'scer_tokens_total{model="m",kind="prompt",tenant="acme"} 30',
            'scer_tokens_total{model="m",kind="completion",tenant="acme"} 60',
            'scer_tokens_total{model="m",kind="prompt",tenant="other"} 50',
            'scer_tokens_total{model="m",kind="completion",tenant="other"} 100',
            "# TYPE scer_energy_joules counter",
            'scer_energy_joules_total{model="m",source="dcgm",tenant="acme"} 12',
            'scer_energy_joules_total{model="m",source="dcgm",tenant="other"} 20',
            "# TYPE scer_carbon_grams counter",
            'scer_carbon_grams_total{model="m",part="operational",tenant="acme"} 0.5',
            'scer_carbon_grams_total{model="m",part="embodied",tenant="acme"} 0.25',
            'scer_carbon_grams_total{model="m",part="operational",tenant="other"} 1',
            'scer_carbon_grams_total{model="m",part="embodied",tenant="other"} 1',
            "",
        ]
    )

    def exporter() -> web.Application:
        async def metrics(_: web.Request) -> web.Response:
            return web.Response(text=exposition)

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        return app

    target = fleet.servers.start(exporter)
    fake, prom = fleet.prometheus((target, "t"))
    summary = report_json(["--prometheus", prom, "--tenant", "acme"], capsys)
    assert fake.rejected == []
    assert summary["totals"] | {"metered_requests": 0, "settled_requests": 0} == {
        "requests": 3,
        "prompt_tokens": 30,
        "completion_tokens": 60,
        "energy_j": 12.0,
        "carbon_g": 0.75,
        "carbon_operational_g": 0.5,
        "carbon_embodied_g": 0.25,
        "energy_j_per_1k_output_tokens": 200.0,
        "sci": 12.5,
        "metered_requests": 0,
        "settled_requests": 0,
    }
    assert summary["idle_energy_j"] is None and summary["meter"] == {"healthy": None}


def _answering(status: int, body: bytes, content_type: str) -> web.Application:
    async def query(_: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type=content_type)

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    return app


@pytest.mark.parametrize(
    "status, body, content_type, reason",
    [
        (503, b"Service Unavailable", "text/plain", "HTTP 503 Service Unavailable"),
        (
            422,
            b'{"status":"error","errorType":"execution","error":"query timed out\\nin a line"}',
            "application/json",
            "HTTP 422: execution: query timed out in a line",
        ),
        (
            200,
            b'{"status":"error","errorType":"internal","error":"boom"}',
            "application/json",
            "internal: boom",
        ),
        (200, b"<html>not prometheus</html>", "text/html", "not JSON"),
        (
            200,
            b'{"status":"success","data":{"resultType":"matrix","result":[]}}',
            "application/json",
            "matrix",
        ),
    ],
)
def test_a_failing_prometheus_is_one_line_exit_1(
    fleet: Fleet, capsys: pytest.CaptureFixture[str], status: int, body: bytes, content_type: str, reason: str
) -> None:
    url = fleet.servers.start(lambda: _answering(status, body, content_type))
    code, out, err = report(["--prometheus", url], capsys)
    assert code == 1 and out == ""
    assert (
        err.count("\n") == 1 and err.startswith(f"scer-proxy report: Prometheus at {url}: ") and reason in err
    )


def test_unreachable_prometheus_is_one_line_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()  # a port nobody listens on
    code, out, err = report(["--prometheus", f"http://127.0.0.1:{port}", "--format", "json"], capsys)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith(f"scer-proxy report: Prometheus at http://127.0.0.1:{port}: unreachable")


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--prometheus", "prometheus:9090"], "--prometheus"),
        (["--prometheus", "ftp://prometheus:9090"], "--prometheus"),
        (["--prometheus", "http://"], "--prometheus"),
        (["--prometheus", "http://prometheus:99999"], "--prometheus"),
        (["--prometheus", "http://prom etheus:9090"], "--prometheus"),
        (["--prometheus", ""], "--prometheus"),
        (["--prometheus", "http://127.0.0.1:9", "--since", "yesterday"], "--since"),
        (["--prometheus", "http://127.0.0.1:9", "--since", "0s"], "--since"),
    ],
)
def test_bad_usage_is_one_line_exit_2(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = report(argv, capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"scer-proxy report: {flag}: ")


def test_promql_building_blocks() -> None:
    assert [promql.duration(s) for s in (5400, 3600, 7 * 86400, 90, 1.5, 0.25 * 3600)] == [
        "90m",
        "1h",
        "7d",
        "90s",
        "1500ms",
        "15m",
    ]
    with pytest.raises(ValueError):
        promql.duration(0)
    assert promql.string('a"b\\c\nd') == '"a\\"b\\\\c\\nd"'
    queries = promql.summary_queries(3600.0, model="m")
    assert queries["requests"] == 'sum by (model) (increase(scer_requests_total{model="m"}[1h]))'
    assert (
        queries["energy"]
        == 'sum by (model) (increase(scer_energy_joules_total{model="m",source!="none"}[1h]))'
    )
    assert promql.summary_queries(None)["tokens"] == "sum by (model, kind) (scer_tokens_total)"
    assert promql.check_url(" http://prom:9090/prefix/ ") == "http://prom:9090/prefix"
    with pytest.raises(promql.PrometheusError):
        promql.vector({"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}}]}})
