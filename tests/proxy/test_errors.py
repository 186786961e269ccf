"""Proxy-made errors answer in the OpenAI error shape with the right status, and the server keeps serving."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import httpx
import orjson
import pytest

from scer_proxy.config import UpstreamConfig
from scer_proxy.proxy.serving import free_port
from tests.conftest import proxy_config
from tests.fake_upstream import MODEL

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def _assert_openai_error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def _healthy(proxy: str, client: httpx.Client) -> None:
    assert client.get(f"{proxy}/scer/health").status_code == 200


def test_upstream_refused_is_502(start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(f"http://127.0.0.1:{free_port()}", meter={"kind": "auto"})
    with httpx.Client() as client:
        for path, body in (("/v1/chat/completions", CHAT), ("/v1/models", None)):
            resp = client.post(f"{proxy}{path}", json=body) if body else client.get(f"{proxy}{path}")
            _assert_openai_error(resp, 502, "upstream_unavailable")
        _healthy(proxy, client)
        records = client.get(f"{proxy}/scer/requests?limit=5").json()["data"]
    assert records[0]["status"] == "error" and "upstream_unavailable" in records[0]["flags"]


def test_upstream_timeout_is_504(fake_upstream: str, start_proxy: Callable[..., str]) -> None:
    config = dataclasses.replace(
        proxy_config(fake_upstream, meter={"kind": "auto"}),
        upstreams=(UpstreamConfig(name="up", url=fake_upstream, timeout_s=0.3),),
    )
    proxy = start_proxy(config=config)
    with httpx.Client(timeout=10) as client:
        resp = client.post(
            f"{proxy}/v1/chat/completions",
            json=CHAT,
            headers={"X-Fake-Scenario": "slow", "X-Fake-Delay": "2"},
        )
        _assert_openai_error(resp, 504, "upstream_timeout")
        assert client.post(f"{proxy}/v1/chat/completions", json=CHAT).status_code == 200


def test_upstream_dropping_the_connection_is_502(fake_upstream: str, start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(fake_upstream, meter={"kind": "auto"})
    with httpx.Client() as client:
        resp = client.post(f"{proxy}/v1/chat/completions", json=CHAT, headers={"X-Fake-Scenario": "drop"})
        _assert_openai_error(resp, 502)
        assert client.post(f"{proxy}/v1/chat/completions", json=CHAT).status_code == 200


@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_the_limit_is_413(
    fake_upstream: str, start_proxy: Callable[..., str], chunked: bool
) -> None:
    proxy = start_proxy(fake_upstream, meter={"kind": "auto"}, server={"max_body_bytes": 1000})
    big = orjson.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]})
    with httpx.Client() as client:
        content = iter([big[:500], big[500:]]) if chunked else big
        resp = client.post(
            f"{proxy}/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}
        )
        _assert_openai_error(resp, 413, "request_too_large")
        assert client.post(f"{proxy}/v1/chat/completions", json=CHAT).status_code == 200


def test_no_upstream_for_the_model_is_404(fake_upstream: str, start_proxy: Callable[..., str]) -> None:
    config = dataclasses.replace(
        proxy_config(fake_upstream, meter={"kind": "auto"}),
        upstreams=(UpstreamConfig(name="only-llama", url=fake_upstream, models=("llama-*",)),),
    )
    proxy = start_proxy(config=config)
    with httpx.Client() as client:
        error = _assert_openai_error(
            client.post(f"{proxy}/v1/chat/completions", json=CHAT), 404, "model_not_found"
        )
        assert MODEL in error["message"]
        _healthy(proxy, client)


def test_routing_by_model_is_remembered_within_a_bound(fake_upstream: str) -> None:
    # Any client can name any model: the handler remembers each model's upstream, in a map kept bounded.
    from scer_proxy.proxy.handler import ProxyHandler

    config = dataclasses.replace(
        proxy_config(fake_upstream, meter={"kind": "auto"}),
        upstreams=(
            UpstreamConfig(name="llama", url=fake_upstream, models=("llama-*",)),
            UpstreamConfig(name="rest", url=fake_upstream, models=("qwen-*", "mistral")),
        ),
    )
    handler = ProxyHandler(config, upstreams=None, accounting=None)  # type: ignore[arg-type]
    for i in range(10_000):
        for model, expected in (
            (f"llama-{i}", "llama"),
            (f"qwen-{i}", "rest"),
            (f"gpt-{i}", None),
            ("mistral", "rest"),
        ):
            upstream = handler._upstream_for(model)
            assert (upstream.name if upstream is not None else None) == expected, model
        assert len(handler._routes) <= 4096
    assert handler._upstream_for("llama-0") is config.upstreams[0]


def test_malformed_body_is_forwarded_untouched(fake_upstream: str, start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(fake_upstream, meter={"kind": "auto"})
    with httpx.Client() as client:
        direct = client.post(
            f"{fake_upstream}/v1/chat/completions",
            content=b"{oops",
            headers={"Content-Type": "application/json"},
        )
        via = client.post(
            f"{proxy}/v1/chat/completions", content=b"{oops", headers={"Content-Type": "application/json"}
        )
        assert via.status_code == direct.status_code == 400
        assert via.content == direct.content
        _healthy(proxy, client)


def test_upstream_error_passes_through_with_request_id(
    fake_upstream: str, start_proxy: Callable[..., str]
) -> None:
    proxy = start_proxy(fake_upstream, meter={"kind": "auto"})
    with httpx.Client() as client:
        resp = client.post(
            f"{proxy}/v1/chat/completions", json=CHAT, headers={"X-Fake-Scenario": "upstream-400"}
        )
        assert resp.status_code == 400
        assert resp.json()["error"]["type"] == "exceed_context_size_error"
        rid = resp.headers["x-scer-request-id"]
        record = client.get(f"{proxy}/scer/requests/{rid}").json()
    assert record["status"] == "upstream_error" and record["http_status"] == 400


def test_unknown_proxy_path_and_bad_query(fake_upstream: str, start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(fake_upstream, meter={"kind": "auto"})
    with httpx.Client() as client:
        _assert_openai_error(client.get(f"{proxy}/nothing-here"), 404)
        _assert_openai_error(client.get(f"{proxy}/scer/summary?since=yesterday"), 400)
        _assert_openai_error(client.get(f"{proxy}/scer/requests?limit=-1"), 400)
        _assert_openai_error(client.get(f"{proxy}/scer/requests/nope"), 404, "request_not_found")
        _healthy(proxy, client)


def test_admin_token_gates_scer_and_metrics_but_not_v1(
    fake_upstream: str, start_proxy: Callable[..., str]
) -> None:
    proxy = start_proxy(fake_upstream, meter={"kind": "auto"}, server={"admin_token": "s3cret"})
    with httpx.Client() as client:
        assert client.post(f"{proxy}/v1/chat/completions", json=CHAT).status_code == 200
        for path in ("/scer/summary", "/scer/health", "/metrics"):
            _assert_openai_error(client.get(f"{proxy}{path}"), 401)
            _assert_openai_error(client.get(f"{proxy}{path}", headers={"Authorization": "Bearer wrong"}), 401)
            assert client.get(f"{proxy}{path}", headers={"Authorization": "Bearer s3cret"}).status_code == 200
