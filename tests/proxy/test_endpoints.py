"""Usage accounting for every metered endpoint, and the counting fallbacks when usage is absent."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import orjson
import pytest
from aiohttp import web

from scer_proxy.sim import create_sim_app
from scer_proxy.wire.tokens import count_prompt, count_text
from tests.fake_upstream import MODEL, RECEIVED, RESPONSE_USAGE, responses_events
from tests.servers import ThreadedServers

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "rivers?"}]}


def test_embeddings_are_metered_per_input_token(fake_upstream: str, start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(fake_upstream, meter={"kind": "auto"})
    resp = httpx.post(f"{proxy}/v1/embeddings", json={"model": MODEL, "input": ["a", "b"]})
    assert resp.status_code == 200 and len(resp.json()["data"]) == 2
    assert resp.headers["x-scer-prompt-tokens"] == "40"
    assert resp.headers["x-scer-completion-tokens"] == "0"
    assert resp.headers["x-scer-token-source"] == "upstream"
    record = httpx.get(f"{proxy}/scer/requests/{resp.headers['x-scer-request-id']}").json()
    assert record["endpoint"] == "embeddings"


def test_responses_api_non_streamed_and_streamed(fake_upstream: str, start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(fake_upstream, meter={"kind": "auto"})
    body = {"model": MODEL, "input": "say hi"}
    resp = httpx.post(f"{proxy}/v1/responses", json=body)
    assert resp.headers["x-scer-prompt-tokens"] == str(RESPONSE_USAGE["input_tokens"])
    assert resp.headers["x-scer-completion-tokens"] == str(RESPONSE_USAGE["output_tokens"])
    streamed = httpx.post(f"{proxy}/v1/responses", json={**body, "stream": True})
    events = [e for e in streamed.content.split(b"\n\n") if e]
    direct = [e.rstrip(b"\n") for e in responses_events()]
    assert events[:-1] == direct[:-1]  # every event but the last passes byte for byte
    assert events[-1].startswith(b"event: response.completed\ndata: ")
    completed = orjson.loads(events[-1].split(b"data: ", 1)[1])
    scer = completed["response"]["usage"].pop("scer")
    assert completed["response"]["usage"] == RESPONSE_USAGE
    assert scer["completion_tokens"] == 4 and scer["request_id"] == streamed.headers["x-scer-request-id"]
    assert b": scer" not in streamed.content


def test_missing_usage_is_counted_with_the_upstreams_tokenize(
    fake_upstream: str, start_proxy: Callable[..., str], servers: ThreadedServers
) -> None:
    proxy = start_proxy(fake_upstream, meter={"kind": "auto"})
    resp = httpx.post(f"{proxy}/v1/chat/completions", json=CHAT, headers={"X-Fake-Scenario": "no-usage"})
    assert resp.headers["x-scer-token-source"] == "tokenizer"
    # The fake /tokenize counts words: "Rivers run to the sea." -> 5, unlike cl100k's 6.
    assert resp.headers["x-scer-completion-tokens"] == "5"
    assert resp.headers["x-scer-prompt-tokens"] == str(count_prompt("chat", CHAT))
    assert any(r["path"] == "/tokenize" for r in servers._runners[0].app[RECEIVED])
    streamed = httpx.post(
        f"{proxy}/v1/chat/completions",
        json={**CHAT, "stream": True},
        headers={"X-Fake-Scenario": "no-stream-usage"},
    )
    comment = orjson.loads(next(x for x in streamed.text.splitlines() if x.startswith(": scer "))[7:])
    assert comment["token_source"] == "tokenizer" and comment["completion_tokens"] == 5


@pytest.mark.parametrize("tokenize_endpoint", [True, False])
def test_stream_without_usage_is_counted_exactly(
    servers: ThreadedServers, start_proxy: Callable[..., str], tokenize_endpoint: bool
) -> None:
    # A server that never sends usage on streams (llama-cpp-python's behaviour), with and without /tokenize.
    sim = servers.start(
        lambda: create_sim_app(time_scale=50.0, usage_on_streams=False, tokenize_endpoint=tokenize_endpoint)
    )
    proxy = start_proxy(sim, meter={"kind": "simulated"})
    model = httpx.get(f"{sim}/v1/models").json()["data"][0]["id"]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "tell me"}],
        "max_tokens": 25,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    resp = httpx.post(f"{proxy}/v1/chat/completions", json=body)
    lines = resp.text.splitlines()
    text = "".join(
        orjson.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in lines
        if line.startswith("data: {")
    )
    comment = orjson.loads(next(line for line in lines if line.startswith(": scer "))[7:])
    assert comment["token_source"] == "tokenizer"
    assert comment["completion_tokens"] == count_text(text)
    assert comment["prompt_tokens"] == count_prompt("chat", body)


def test_simulator_faults_pass_through_unchanged(
    servers: ThreadedServers, start_proxy: Callable[..., str]
) -> None:
    sim = servers.start(lambda: create_sim_app(time_scale=50.0))
    proxy = start_proxy(sim, meter={"kind": "simulated"})
    model = httpx.get(f"{sim}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    httpx.post(f"{sim}/sim/faults", json={"status_429": 1, "status_500": 1})
    limited = httpx.post(f"{proxy}/v1/chat/completions", json=body)
    failed = httpx.post(f"{proxy}/v1/chat/completions", json=body)
    assert limited.status_code == 429 and "retry-after" in limited.headers
    assert limited.json()["error"]["type"] and failed.status_code == 500
    assert httpx.post(f"{proxy}/v1/chat/completions", json=body).status_code == 200
    statuses = [r["status"] for r in httpx.get(f"{proxy}/scer/requests?limit=3").json()["data"]]
    assert statuses == ["ok", "upstream_error", "upstream_error"]


def _ollama_like() -> web.Application:
    """Ollama's /v1/completions streams: a placeholder zero usage on every chunk once usage is requested."""

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        asked = (body.get("stream_options") or {}).get("include_usage") is True
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1,
            "model": "m",
            "system_fingerprint": "fp",
        }
        for text, reason in [("A", None), (" b", None), (" c", None), ("", "stop")]:
            chunk: dict = {**base, "choices": [{"text": text, "index": 0, "finish_reason": reason}]}
            if asked:
                chunk["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        if asked:
            final = {
                **base,
                "choices": [],
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
            }
            await resp.write(b"data: " + orjson.dumps(final) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    return app


@pytest.mark.parametrize("asked", [True, False])
def test_placeholder_usage_on_content_chunks_is_not_the_final_usage(
    servers: ThreadedServers, start_proxy: Callable[..., str], asked: bool
) -> None:
    proxy = start_proxy(servers.start(_ollama_like), meter={"kind": "auto"})
    body: dict = {"model": "m", "prompt": "x", "stream": True}
    if asked:
        body["stream_options"] = {"include_usage": True}
    resp = httpx.post(f"{proxy}/v1/completions", json=body)
    record = httpx.get(f"{proxy}/scer/requests/{resp.headers['x-scer-request-id']}").json()
    assert (record["prompt_tokens"], record["completion_tokens"]) == (5, 3)
    chunks = [orjson.loads(line[6:]) for line in resp.content.splitlines() if line.startswith(b"data: {")]
    assert [c["choices"][0]["text"] for c in chunks if c["choices"]] == ["A", " b", " c", ""]
    if asked:
        scer = [
            c["usage"]["scer"] for c in chunks if isinstance(c.get("usage"), dict) and "scer" in c["usage"]
        ]
        assert len(scer) == 1 and scer[0]["completion_tokens"] == 3
        # The placeholder usage passes as the server sent it.
        assert (
            sum(
                1
                for c in chunks
                if c.get("usage") == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            )
            == 4
        )
    else:
        assert all("usage" not in c for c in chunks)
