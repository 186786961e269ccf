"""Requests that used no GPU carry no energy: an error answered before any token is a settled, flagged zero.

A real proxy in front of the real simulator (and, for an upstream that cannot be reached, a closed port).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import httpx
import pytest

from scer_proxy.config import UpstreamConfig
from scer_proxy.proxy.accounting import used_no_gpu
from scer_proxy.proxy.serving import free_port
from scer_proxy.sim import create_sim_app
from tests.conftest import proxy_config
from tests.servers import ThreadedServers

ZERO_FIELDS = (
    "energy_j",
    "energy_gpu_j",
    "energy_prefill_j",
    "energy_decode_j",
    "energy_idle_j",
    "hardware_s",
    "carbon_g",
    "carbon_operational_g",
    "carbon_embodied_g",
    "sci",
    "energy_uncertainty_rel",
)


def _assert_real_zero(record: dict, source: str) -> None:
    """Every energy and carbon figure is 0 (a number, not None), settled at once, and flagged why."""
    for name in ZERO_FIELDS:
        assert record[name] == 0 and record[name] is not None, (name, record[name])
    assert record["energy_source"] == source
    assert record["settled"] is True
    assert "no_gpu_work" in record["flags"]
    assert "meter_error" not in record["flags"]


def test_unknown_model_at_the_upstream_is_a_settled_zero(
    servers: ThreadedServers, start_proxy: Callable[..., str]
) -> None:
    sim = servers.start(lambda: create_sim_app(time_scale=50.0))
    proxy = start_proxy(sim, meter={"kind": "simulated", "interval_ms": 20})
    model = httpx.get(f"{sim}/v1/models").json()["data"][0]["id"]
    messages = [{"role": "user", "content": "rivers of the world, longest first"}]
    with httpx.Client(base_url=proxy, timeout=10) as http:
        ok = http.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 8})
        assert ok.status_code == 200
        refused = http.post("/v1/chat/completions", json={"model": "no-such-model", "messages": messages})
        # The upstream's 404, in the OpenAI error shape, passed on as it came.
        assert refused.status_code == 404
        error = refused.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == "model_not_found"
        assert "X-SCER-Energy-J" not in refused.headers
        # Read at once: the zero is final at the response, never pending.
        record = http.get(f"/scer/requests/{refused.headers['X-SCER-Request-Id']}").json()
        assert (record["status"], record["http_status"], record["completion_tokens"]) == (
            "upstream_error",
            404,
            0,
        )
        assert record["prompt_tokens"] > 0  # a prompt was sent: the zero is not for want of one
        _assert_real_zero(record, "simulated")
        # The simulator's own error answers (429, 500) used no GPU either.
        httpx.post(f"{sim}/sim/faults", json={"status_500": 1})
        failed = http.post("/v1/chat/completions", json={"model": model, "messages": messages})
        assert failed.status_code == 500
        _assert_real_zero(
            http.get(f"/scer/requests/{failed.headers['X-SCER-Request-Id']}").json(), "simulated"
        )
        # Nothing is left waiting for settlement but the successful request (if its reading is not in yet).
        assert http.get("/scer/health").json()["ledger"]["pending_settlement"] <= 1
        answered = http.get(f"/scer/requests/{ok.headers['X-SCER-Request-Id']}").json()
        assert answered["energy_j"] > 0 and "no_gpu_work" not in answered["flags"]


def test_an_upstream_that_cannot_be_reached_is_a_settled_zero(
    servers: ThreadedServers, start_proxy: Callable[..., str]
) -> None:
    sim = servers.start(lambda: create_sim_app(time_scale=50.0))
    config = proxy_config(sim, meter={"kind": "simulated", "interval_ms": 20})
    down = UpstreamConfig(name="down", url=f"http://127.0.0.1:{free_port()}", models=("down-*",))
    config = dataclasses.replace(config, upstreams=(down, *config.upstreams))
    proxy = start_proxy(config=config)
    body = {"model": "down-model", "messages": [{"role": "user", "content": "hello"}]}
    resp = httpx.post(f"{proxy}/v1/chat/completions", json=body, timeout=10)
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "upstream_unavailable"
    records = httpx.get(f"{proxy}/scer/requests?limit=1").json()["data"]
    assert len(records) == 1 and records[0]["upstream"] == "down"
    record = records[0]
    assert (record["status"], record["http_status"]) == ("error", 502)
    assert "upstream_unavailable" in record["flags"]
    _assert_real_zero(record, "simulated")


@pytest.mark.parametrize(
    ("status", "http_status", "completion_tokens", "reached", "void"),
    [
        ("upstream_error", 404, 0, True, True),  # the upstream refused it before scheduling
        ("upstream_error", 500, 0, True, True),
        ("upstream_error", 500, 3, True, False),  # it produced tokens: the GPU worked
        ("ok", 200, 0, True, False),  # an answer with no tokens still prefilled its prompt
        ("cancelled", None, 0, True, False),  # the prompt was sent: it may have been prefilled
        ("error", 502, 0, False, True),  # never reached the upstream (connection refused)
        ("error", 504, 0, False, True),  # connect timeout: never sent
        ("error", 504, 0, True, False),  # read timeout: sent, and it may have been running
        ("error", None, 0, True, False),  # a proxy failure after sending
    ],
)
def test_the_void_rule(
    status: str, http_status: int | None, completion_tokens: int, reached: bool, void: bool
) -> None:
    assert (
        used_no_gpu(
            status=status,
            http_status=http_status,
            completion_tokens=completion_tokens,
            reached_upstream=reached,
        )
        is void
    )
