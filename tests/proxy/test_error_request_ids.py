"""Every error the proxy makes after it opened a record names that record (issue 14).

Proxy-made 502 and 504 answers carried no ``X-SCER-Request-Id`` although a record was written for
them, so a client could not find its request in the ledger.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import httpx
import pytest

from scer_proxy.config import UpstreamConfig
from scer_proxy.proxy import handler
from scer_proxy.proxy.serving import free_port
from tests.conftest import proxy_config
from tests.fake_upstream import MODEL

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def _assert_named(proxy: str, resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    rid = resp.headers["x-scer-request-id"]
    assert resp.headers["x-scer-model"] == MODEL
    record = httpx.get(f"{proxy}/scer/requests/{rid}").json()
    assert record["request_id"] == rid and record["status"] == "error" and code in record["flags"]


@pytest.mark.parametrize("stream", [False, True])
def test_refused_connection_502_names_its_record(start_proxy: Callable[..., str], stream: bool) -> None:
    proxy = start_proxy(f"http://127.0.0.1:{free_port()}", meter={"kind": "estimate"})
    resp = httpx.post(f"{proxy}/v1/chat/completions", json={**CHAT, "stream": stream})
    _assert_named(proxy, resp, 502, "upstream_unavailable")


def test_dropped_connection_502_names_its_record(fake_upstream: str, start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(fake_upstream, meter={"kind": "estimate"})
    resp = httpx.post(f"{proxy}/v1/chat/completions", json=CHAT, headers={"X-Fake-Scenario": "drop"})
    _assert_named(proxy, resp, 502, "upstream_unavailable")


@pytest.mark.parametrize("stream", [False, True])
def test_timeout_504_names_its_record(
    fake_upstream: str, start_proxy: Callable[..., str], stream: bool
) -> None:
    config = dataclasses.replace(
        proxy_config(fake_upstream, meter={"kind": "estimate"}),
        upstreams=(UpstreamConfig(name="up", url=fake_upstream, timeout_s=0.3),),
    )
    proxy = start_proxy(config=config)
    resp = httpx.post(
        f"{proxy}/v1/chat/completions",
        json={**CHAT, "stream": stream},
        headers={"X-Fake-Scenario": "slow", "X-Fake-Delay": "2"},
        timeout=10,
    )
    _assert_named(proxy, resp, 504, "upstream_timeout")


def test_proxy_failure_500_names_its_record(
    fake_upstream: str, start_proxy: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(usage: object) -> None:
        raise RuntimeError("a bug in reading usage")

    monkeypatch.setattr(handler.wire, "read_usage", broken)
    proxy = start_proxy(fake_upstream, meter={"kind": "estimate"})
    resp = httpx.post(f"{proxy}/v1/chat/completions", json=CHAT)
    _assert_named(proxy, resp, 500, "proxy_failure")
    assert httpx.get(f"{proxy}/scer/health").status_code == 200
