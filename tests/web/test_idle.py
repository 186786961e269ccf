"""Idle energy in ``/scer/summary``, ``/scer/health``, ``/metrics`` and the records, through a real proxy in
front of the real simulator: what is measured is attributed to requests (their idle shares included) or
reported as idle (apart, or the balance still waiting), none lost and none invented."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from scer_proxy.attribution.timeline import Timeline
from scer_proxy.sim import create_sim_app
from tests.servers import ThreadedServers

IDLE_KEYS = {"policy", "window_s", "separate_j", "balance_j", "spread_j", "ratio"}
REL = 1e-6


def _traffic(http: httpx.Client, model: str, n: int) -> list[str]:
    """``n`` chat completions, some streamed, a few at a time; their request ids."""

    def one(i: int) -> str:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": f"tell me about river {i} " * (1 + i % 5)}],
            "max_tokens": 8 + 4 * (i % 4),
            "stream": i % 2 == 1,
        }
        resp = http.post("/v1/chat/completions", json=body)
        assert resp.status_code == 200
        return resp.headers["X-SCER-Request-Id"]

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(n)))


def _quiet(http: httpx.Client) -> dict[str, Any]:
    """Wait until every request is settled and every measured interval split; the health then."""
    deadline = time.monotonic() + 20
    while True:
        health = http.get("/scer/health").json()
        meters = health["meter"]["upstreams"]
        if not (
            any(m["pending_requests"] or m["deferred_intervals"] for m in meters)
            or health["ledger"]["pending_settlement"]
        ):
            return health
        assert time.monotonic() < deadline, "never settled"
        time.sleep(0.02)


def _measured(health: dict[str, Any]) -> float:
    return sum(m["measured_j"] for m in health["meter"]["upstreams"])


def _run(
    servers: ThreadedServers, start_proxy: Callable[..., str], idle: str
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], list[dict[str, Any]], str]:
    """Traffic, an idle wait, traffic again, settled: health before, summary, health after, records."""
    sim = servers.start(lambda: create_sim_app(time_scale=50.0))
    proxy = start_proxy(
        sim,
        meter={"kind": "simulated", "interval_ms": 20},
        attribution={"idle": idle, "idle_window_s": 120},
    )
    with httpx.Client(base_url=proxy, timeout=20) as http:
        model = httpx.get(f"{sim}/v1/models").json()["data"][0]["id"]
        ids = _traffic(http, model, 8)
        _quiet(http)
        time.sleep(0.4)  # idle: 20 s of the simulator's time
        ids += _traffic(http, model, 8)
        before = _quiet(http)
        summary = http.get("/scer/summary").json()
        after = http.get("/scer/health").json()
        records = http.get("/scer/requests?limit=100").json()["data"]
    assert sorted(r["request_id"] for r in records) == sorted(ids)
    return before, summary, after, records, proxy


def _conserved(before: dict[str, Any], summary: dict[str, Any], after: dict[str, Any]) -> None:
    """Attributed + idle = measured; idle keeps accruing between the reads, so within the range they give."""
    total = summary["totals"]["energy_j"] + summary["idle_energy_j"]
    low, high = _measured(before), _measured(after)
    assert low > 0
    assert low * (1 - REL) <= total <= high * (1 + REL), (low, total, high)


def test_amortized_idle_is_in_the_records_and_the_balance(
    servers: ThreadedServers, start_proxy: Callable[..., str]
) -> None:
    before, summary, after, records, proxy = _run(servers, start_proxy, "amortize")
    idle = summary["idle"]
    assert set(idle) == IDLE_KEYS
    assert idle["policy"] == "amortize" and idle["window_s"] == 120.0  # the timelines' own window
    assert idle["separate_j"] == 0 and idle["balance_j"] >= 0
    # What is measured and not attributed: the balance still waiting (no longer zero under amortize).
    assert summary["idle_energy_j"] == idle["separate_j"] + idle["balance_j"]
    _conserved(before, summary, after)
    assert all(r["settled"] for r in records)
    for r in records:
        assert r["energy_idle_j"] is not None and 0 <= r["energy_idle_j"] <= r["energy_j"], r
        assert r["energy_prefill_j"] + r["energy_decode_j"] + r["energy_idle_j"] == pytest.approx(
            r["energy_j"], rel=1e-9
        )
    # The idle wait was spread over the requests after it, and the records hold exactly that.
    assert idle["spread_j"] > 0
    assert sum(r["energy_idle_j"] for r in records) == pytest.approx(idle["spread_j"], rel=1e-9)
    assert idle["ratio"] is not None and idle["ratio"] > 0
    # /scer/health: what each timeline learned, the idle ratio and balance among it.
    learned_keys = set(Timeline().learned.describe()) | {"idle_ratio", "idle_balance_j"}
    for health in (before, after):
        (meter,) = health["meter"]["upstreams"]
        assert set(meter["learned"]) == learned_keys
        assert meter["learned"]["prefill_samples"] > 0 and meter["learned"]["j_per_decode_token"] > 0
    # Idle only accrues once everything is settled: the ratio and balance grow between the reads.
    ratio_before = before["meter"]["upstreams"][0]["learned"]["idle_ratio"]
    ratio_after = after["meter"]["upstreams"][0]["learned"]["idle_ratio"]
    assert ratio_before is not None and ratio_after is not None
    assert ratio_before * (1 - REL) <= idle["ratio"] <= ratio_after * (1 + REL)
    balance_before = before["meter"]["upstreams"][0]["learned"]["idle_balance_j"]
    balance_after = after["meter"]["upstreams"][0]["learned"]["idle_balance_j"]
    assert balance_before * (1 - REL) <= idle["balance_j"] <= balance_after * (1 + REL)
    # /metrics: the balance gauge, read later still.
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{proxy}/metrics").text)}
    (sample,) = families["scer_idle_balance_joules"].samples
    assert sample.value >= idle["balance_j"] * (1 - REL) and sample.value > 0


def test_separate_idle_is_reported_apart_and_in_no_record(
    servers: ThreadedServers, start_proxy: Callable[..., str]
) -> None:
    before, summary, after, records, _proxy = _run(servers, start_proxy, "separate")
    idle = summary["idle"]
    assert set(idle) == IDLE_KEYS and idle["policy"] == "separate"
    assert idle["balance_j"] == 0 and idle["spread_j"] == 0 and idle["ratio"] is None
    assert idle["separate_j"] > 0 and summary["idle_energy_j"] == idle["separate_j"]
    _conserved(before, summary, after)
    assert all(r["settled"] and r["energy_idle_j"] == 0 and r["energy_j"] > 0 for r in records)
    assert before["meter"]["upstreams"][0]["learned"]["idle_balance_j"] == 0
