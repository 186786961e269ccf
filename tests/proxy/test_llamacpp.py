"""The proxy in front of llama.cpp's own OpenAI-compatible server (``llama-server``), end to end.

Needs the binary and the tiny generated model (``python scripts/llamacpp_setup.py``). Without them these
tests are skipped locally and fail under CI (``$CI`` set), so CI never passes without running them.

The meter is ``estimate``: llama-server has no energy counter and these machines have neither a GPU
nor readable RAPL. The tests check token accounting and wire behaviour against what llama-server itself reports (its ``usage``, its
``/tokenize`` and its Prometheus counters).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import aiohttp
import httpx
import openai
import orjson
import pytest
from aiohttp import web
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk

from scer_proxy.wire.tokens import count_text
from tests import llamacpp
from tests.llamacpp import ALIAS, LlamaServer
from tests.servers import ThreadedServers

pytestmark = pytest.mark.llamacpp

MSGS = [{"role": "user", "content": "Tell me about rivers and the sea."}]
PROMPT = "Once upon a time"
GREEDY: dict[str, Any] = {"temperature": 0.0}  # deterministic text, so direct and proxied answers compare


METER = "estimate"


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    why = llamacpp.missing()
    if why is not None:
        message = f"{why}; {llamacpp.SETUP_HINT}"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the llama.cpp tests: {message}", pytrace=False)
        pytest.skip(message)
    server = llamacpp.start_llama_server(tmp_path_factory.mktemp("llama-server"))
    yield server
    server.stop()


@pytest.fixture
def proxy(llama: LlamaServer, start_proxy: Callable[..., str]) -> str:
    return start_proxy(llama.url, meter={"kind": METER, "interval_ms": 50})


@pytest.fixture
def clients(llama: LlamaServer, proxy: str) -> Iterator[tuple[openai.OpenAI, openai.OpenAI]]:
    direct = openai.OpenAI(base_url=f"{llama.url}/v1", api_key="sk-test", max_retries=0, timeout=30)
    via = openai.OpenAI(base_url=f"{proxy}/v1", api_key="sk-test", max_retries=0, timeout=30)
    yield direct, via
    direct.close()
    via.close()


def _record(proxy: str, rid: str) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:
        resp = httpx.get(f"{proxy}/scer/requests/{rid}")
        if resp.status_code == 200 or time.monotonic() > deadline:
            assert resp.status_code == 200, resp.text
            record: dict[str, Any] = resp.json()
            return record
        time.sleep(0.02)


def _sse_data(raw: bytes) -> list[dict[str, Any]]:
    """The JSON payloads of a raw SSE body's ``data:`` events (``[DONE]`` left out)."""
    out = []
    for line in raw.splitlines():
        if line.startswith(b"data: ") and line[6:].strip() != b"[DONE]":
            out.append(orjson.loads(line[6:]))
    return out


def _scer_comment(raw: bytes) -> dict[str, Any]:
    lines = [line for line in raw.splitlines() if line.startswith(b": scer ")]
    assert len(lines) == 1, raw[-500:]
    figures: dict[str, Any] = orjson.loads(lines[0][len(b": scer ") :])
    return figures


def _text(chunks: list[dict[str, Any]]) -> str:
    out = []
    for chunk in chunks:
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta")
            out.append(
                (delta.get("content") or "") if isinstance(delta, dict) else (choice.get("text") or "")
            )
    return "".join(out)


def _chat_text(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _completion_text(chunks: list[Completion]) -> str:
    return "".join(c.choices[0].text for c in chunks if c.choices)


def _without(chunk: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in chunk.items() if k not in keys}


# --- non-streamed -----------------------------------------------------------------------------------


def test_chat_non_streamed_token_headers_equal_llamacpp_usage(
    clients: tuple[openai.OpenAI, openai.OpenAI], proxy: str
) -> None:
    direct, via = clients
    d = direct.chat.completions.create(model=ALIAS, messages=MSGS, max_tokens=24, **GREEDY)  # type: ignore[arg-type]
    raw = via.chat.completions.with_raw_response.create(
        model=ALIAS,
        messages=MSGS,
        max_tokens=24,  # type: ignore[arg-type]
        **GREEDY,
    )
    v = raw.parse()
    assert v.choices[0].message.content == d.choices[0].message.content
    assert v.choices[0].finish_reason == "length"  # the biased model never stops early
    assert v.usage is not None and d.usage is not None
    assert v.usage.completion_tokens == d.usage.completion_tokens == 24
    assert v.usage.prompt_tokens == d.usage.prompt_tokens
    assert raw.headers["x-scer-prompt-tokens"] == str(v.usage.prompt_tokens)
    assert raw.headers["x-scer-completion-tokens"] == "24"
    assert raw.headers["x-scer-token-source"] == "upstream"
    assert raw.headers["x-scer-model"] == ALIAS
    assert raw.headers["x-scer-energy-source"] == "estimate"
    assert float(raw.headers["x-scer-energy-j"]) > 0
    record = _record(proxy, raw.headers["x-scer-request-id"])
    assert (record["prompt_tokens"], record["completion_tokens"]) == (v.usage.prompt_tokens, 24)
    assert record["status"] == "ok" and record["endpoint"] == "chat"


def test_completions_non_streamed_token_headers_equal_llamacpp_usage(
    clients: tuple[openai.OpenAI, openai.OpenAI], llama: LlamaServer
) -> None:
    direct, via = clients
    d = direct.completions.create(model=ALIAS, prompt=PROMPT, max_tokens=16, **GREEDY)
    raw = via.completions.with_raw_response.create(model=ALIAS, prompt=PROMPT, max_tokens=16, **GREEDY)
    v = raw.parse()
    assert v.choices[0].text == d.choices[0].text
    assert v.usage is not None and d.usage is not None
    assert v.usage.completion_tokens == 16
    # llama.cpp's prompt count is its own tokenizer's count of the prompt.
    assert v.usage.prompt_tokens == len(llama.tokenize(PROMPT))
    assert raw.headers["x-scer-prompt-tokens"] == str(v.usage.prompt_tokens)
    assert raw.headers["x-scer-completion-tokens"] == "16"
    assert raw.headers["x-scer-token-source"] == "upstream"


# --- streamed ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [True, False], ids=["usage", "no-usage"])
def test_chat_stream_with_openai_client(
    clients: tuple[openai.OpenAI, openai.OpenAI], proxy: str, include_usage: bool
) -> None:
    direct, via = clients
    options: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    d_chunks = cast(
        list[ChatCompletionChunk],
        list(
            direct.chat.completions.create(
                model=ALIAS, messages=MSGS, max_tokens=20, stream=True, **GREEDY, **options
            )
        ),
    )  # type: ignore[arg-type]
    with via.chat.completions.with_streaming_response.create(
        model=ALIAS, messages=MSGS, max_tokens=20, stream=True, **GREEDY, **options
    ) as resp:  # type: ignore[arg-type]
        rid = resp.headers["x-scer-request-id"]
        assert resp.headers["x-scer-model"] == ALIAS
        v_chunks = cast(list[ChatCompletionChunk], list(resp.parse()))
    assert _chat_text(v_chunks) == _chat_text(d_chunks) and _chat_text(v_chunks)
    finish = [c.choices[0].finish_reason for c in v_chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    usage_chunks = [c for c in v_chunks if c.usage is not None]
    record = _record(proxy, rid)
    assert record["token_source"] == "upstream"  # asked of llama-server even when the client did not ask
    assert record["completion_tokens"] == 20 and record["status"] == "ok"
    if include_usage:
        d_usage = next(c.usage for c in d_chunks if c.usage is not None)
        assert len(usage_chunks) == 1 and usage_chunks[0].choices == []
        usage = usage_chunks[0].usage
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (
            d_usage.prompt_tokens,
            d_usage.completion_tokens,
        )
        scer = usage.model_extra["scer"]  # type: ignore[index]
        assert scer["request_id"] == rid and scer["token_source"] == "upstream"
        assert scer["completion_tokens"] == 20 and scer["energy_source"] == "estimate"
        assert record["prompt_tokens"] == usage.prompt_tokens
    else:
        assert usage_chunks == [] and all(c.choices for c in v_chunks)


@pytest.mark.parametrize("include_usage", [True, False], ids=["usage", "no-usage"])
def test_completions_stream_with_openai_client(
    clients: tuple[openai.OpenAI, openai.OpenAI], proxy: str, include_usage: bool
) -> None:
    direct, via = clients
    options: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    d_chunks = cast(
        list[Completion],
        list(
            direct.completions.create(
                model=ALIAS, prompt=PROMPT, max_tokens=20, stream=True, **GREEDY, **options
            )
        ),
    )
    with via.completions.with_streaming_response.create(
        model=ALIAS, prompt=PROMPT, max_tokens=20, stream=True, **GREEDY, **options
    ) as resp:
        rid = resp.headers["x-scer-request-id"]
        v_chunks = cast(list[Completion], list(resp.parse()))
    assert _completion_text(v_chunks) == _completion_text(d_chunks) and _completion_text(v_chunks)
    # llama.cpp's variant: usage rides on the finish_reason chunk, asked for or not.
    d_usage = [c for c in d_chunks if c.usage is not None]
    assert len(d_usage) == 1 and d_usage[0].choices and d_usage[0].choices[0].finish_reason == "length"
    v_usage = [c for c in v_chunks if c.usage is not None]
    assert [c.choices[0].finish_reason for c in v_chunks if c.choices and c.choices[0].finish_reason] == [
        "length"
    ]
    record = _record(proxy, rid)
    assert record["completion_tokens"] == 20 and record["token_source"] == "upstream"
    if include_usage:
        assert len(v_usage) == 1 and v_usage[0].choices[0].finish_reason == "length"
        usage = v_usage[0].usage
        assert usage is not None and usage.completion_tokens == 20
        assert usage.prompt_tokens == d_usage[0].usage.prompt_tokens  # type: ignore[union-attr]
        assert usage.model_extra["scer"]["request_id"] == rid  # type: ignore[index]
    else:
        assert v_usage == []


def test_completions_stream_usage_in_finish_chunk_is_removed_for_clients_that_did_not_ask(
    llama: LlamaServer, proxy: str
) -> None:
    """On the wire: llama-server puts usage in the finish chunk unasked; the proxy's client sees none."""
    body = {"model": ALIAS, "prompt": PROMPT, "max_tokens": 12, "stream": True, **GREEDY}
    direct = httpx.post(f"{llama.url}/v1/completions", json=body, timeout=30)
    direct_chunks = _sse_data(direct.content)
    assert "usage" in direct_chunks[-1] and direct_chunks[-1]["choices"][0]["finish_reason"] == "length"
    via = httpx.post(f"{proxy}/v1/completions", json=body, timeout=30)
    assert via.status_code == 200 and via.headers["content-type"].startswith("text/event-stream")
    via_chunks = _sse_data(via.content)
    assert b'"usage"' not in via.content
    assert len(via_chunks) == len(direct_chunks)  # no chunk dropped: the finish chunk carries text and reason
    assert via_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert _text(via_chunks) == _text(direct_chunks)
    # Apart from the usage, the finish chunk is llama-server's own (its timings included); values that
    # differ between two runs (clock, id, timings) are compared by key only.
    assert set(via_chunks[-1]) == set(direct_chunks[-1]) - {"usage"}
    assert _without(via_chunks[-1], "usage", "created", "id", "timings") == _without(
        direct_chunks[-1], "usage", "created", "id", "timings"
    )
    assert via.content.rstrip().endswith(b"data: [DONE]")
    figures = _scer_comment(via.content)
    assert figures["completion_tokens"] == 12 and figures["token_source"] == "upstream"
    assert figures["prompt_tokens"] == direct_chunks[-1]["usage"]["prompt_tokens"]


def test_chat_stream_raw_wire_without_usage(llama: LlamaServer, proxy: str) -> None:
    body = {"model": ALIAS, "messages": MSGS, "max_tokens": 12, "stream": True, **GREEDY}
    direct = _sse_data(httpx.post(f"{llama.url}/v1/chat/completions", json=body, timeout=30).content)
    via = httpx.post(f"{proxy}/v1/chat/completions", json=body, timeout=30)
    chunks = _sse_data(via.content)
    assert b'"usage"' not in via.content and all(c["choices"] for c in chunks)
    assert _text(chunks) == _text(direct)
    # Every key llama-server sends a client that did not ask for usage still reaches it.
    assert [sorted(c) for c in chunks[:-1]] == [sorted(c) for c in direct[:-1]]
    assert _scer_comment(via.content)["completion_tokens"] == 12


def test_chat_stream_finish_chunk_keeps_llamacpp_timings_for_clients_that_did_not_ask(
    llama: LlamaServer, proxy: str
) -> None:
    body = {"model": ALIAS, "messages": MSGS, "max_tokens": 6, "stream": True, **GREEDY}
    direct = _sse_data(httpx.post(f"{llama.url}/v1/chat/completions", json=body, timeout=30).content)
    assert direct[-1]["choices"][0]["finish_reason"] == "length" and "timings" in direct[-1]
    via = _sse_data(httpx.post(f"{proxy}/v1/chat/completions", json=body, timeout=30).content)
    assert via[-1]["choices"][0]["finish_reason"] == "length"
    assert set(via[-1]) == set(direct[-1])  # "timings" moved back from the dropped usage chunk


# --- counting when usage is absent --------------------------------------------------------------------

TOKENIZE_CALLS = web.AppKey("tokenize_calls", list)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def _usage_stripping_relay(upstream: str) -> web.Application:
    """A server like llama-server but without usage anywhere (llama-cpp-python's server on streams)."""

    async def on_startup(app: web.Application) -> None:
        app[SESSION] = aiohttp.ClientSession()

    async def on_cleanup(app: web.Application) -> None:
        await app[SESSION].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.path == "/tokenize":
            request.app[TOKENIZE_CALLS].append(orjson.loads(body))
        parsed = orjson.loads(body) if body else {}
        if isinstance(parsed, dict):
            parsed.pop("stream_options", None)  # never asked for usage: this server does not know it
        async with request.app[SESSION].request(
            request.method,
            upstream + request.path_qs,
            data=orjson.dumps(parsed) if body else None,
            headers={"Content-Type": "application/json"},
        ) as resp:
            if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                out = web.StreamResponse(status=resp.status, headers={"Content-Type": "text/event-stream"})
                await out.prepare(request)
                async for line in resp.content:
                    if line.startswith(b"data: {"):
                        chunk = orjson.loads(line[6:])
                        chunk.pop("usage", None)
                        line = b"data: " + orjson.dumps(chunk) + b"\n"
                    await out.write(line)
                await out.write_eof()
                return out
            answer = await resp.read()
            if request.path.startswith("/v1/") and resp.status == 200:
                decoded = orjson.loads(answer)
                decoded.pop("usage", None)
                answer = orjson.dumps(decoded)
            return web.Response(status=resp.status, body=answer, content_type="application/json")

    app = web.Application()
    app[TOKENIZE_CALLS] = []
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


def test_tokenize_counts_completion_when_usage_is_absent(
    llama: LlamaServer, servers: ThreadedServers, start_proxy: Callable[..., str]
) -> None:
    relay_url = servers.start(lambda: _usage_stripping_relay(llama.url))
    relay_app = servers._runners[-1].app
    proxy = start_proxy(relay_url, meter={"kind": METER})
    body = {"model": ALIAS, "messages": MSGS, "max_tokens": 40, **GREEDY}
    truth = httpx.post(f"{llama.url}/v1/chat/completions", json=body, timeout=30).json()
    resp = httpx.post(f"{proxy}/v1/chat/completions", json=body, timeout=30)
    answer = resp.json()
    assert "usage" not in answer
    text = answer["choices"][0]["message"]["content"]
    assert text == truth["choices"][0]["message"]["content"]
    assert resp.headers["x-scer-token-source"] == "tokenizer"
    # The proxy asked llama-server's /tokenize for exactly that text, and used its count...
    assert relay_app[TOKENIZE_CALLS][-1]["content"] == text
    llama_count = len(llama.tokenize(text))
    assert resp.headers["x-scer-completion-tokens"] == str(llama_count)
    # ...which is llama.cpp's tokenizer, not the built-in cl100k fallback (they differ a lot on this vocabulary),
    assert llama_count != count_text(text)
    # and re-tokenizing the text comes close to the tokens generated (merges may join a few of them).
    assert 0.5 * truth["usage"]["completion_tokens"] <= llama_count <= truth["usage"]["completion_tokens"]

    # A stream without usage is counted the same way at its end.
    streamed = httpx.post(f"{proxy}/v1/chat/completions", json={**body, "stream": True}, timeout=30)
    assert b'"usage"' not in streamed.content
    stream_text = _text(_sse_data(streamed.content))
    figures = _scer_comment(streamed.content)
    assert figures["token_source"] == "tokenizer"
    assert relay_app[TOKENIZE_CALLS][-1]["content"] == stream_text
    assert figures["completion_tokens"] == len(llama.tokenize(stream_text))


# --- errors -----------------------------------------------------------------------------------------


def _overflowing_prompt(llama: LlamaServer) -> str:
    # Byte-level vocabulary: digits and punctuation are one token each, well over one slot's context.
    prompt = "0,1;2.3:4!5?6-7+8=9 " * 160
    assert len(llama.tokenize(prompt)) > llamacpp.CONTEXT // llamacpp.SLOTS
    return prompt


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_context_overflow_error_passes_through_intact(llama: LlamaServer, proxy: str, stream: bool) -> None:
    body = {
        "model": ALIAS,
        "messages": [{"role": "user", "content": _overflowing_prompt(llama)}],
        "max_tokens": 8,
        "stream": stream,
    }
    direct = httpx.post(f"{llama.url}/v1/chat/completions", json=body, timeout=30)
    via = httpx.post(f"{proxy}/v1/chat/completions", json=body, timeout=30)
    assert direct.status_code == 400
    assert via.status_code == 400
    assert via.json() == direct.json()
    assert via.json()["error"]["type"] == "exceed_context_size_error"
    assert via.headers["content-type"] == direct.headers["content-type"]
    assert "x-scer-prompt-tokens" not in via.headers
    record = _record(proxy, via.headers["x-scer-request-id"])
    assert record["status"] == "upstream_error" and record["http_status"] == 400
    assert record["completion_tokens"] == 0


def test_context_overflow_error_reaches_the_openai_client(
    clients: tuple[openai.OpenAI, openai.OpenAI], llama: LlamaServer
) -> None:
    _direct, via = clients
    with pytest.raises(openai.BadRequestError) as caught:
        via.completions.create(model=ALIAS, prompt=_overflowing_prompt(llama), max_tokens=4)
    assert caught.value.status_code == 400
    assert isinstance(caught.value.body, dict) and caught.value.body["type"] == "exceed_context_size_error"


# --- concurrency and cancellation -----------------------------------------------------------------


def test_four_concurrent_streams_one_cancelled(llama: LlamaServer, proxy: str) -> None:
    full = 48

    async def stream(
        client: httpx.AsyncClient, i: int, max_tokens: int, stop_after: int | None
    ) -> dict[str, Any]:
        body = {
            "model": ALIAS,
            "messages": [{"role": "user", "content": f"stream {i}"}],
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        chunks: list[dict[str, Any]] = []
        async with client.stream("POST", f"{proxy}/v1/chat/completions", json=body) as resp:
            rid = resp.headers["x-scer-request-id"]
            async for line in resp.aiter_lines():
                if line.startswith("data: {"):
                    chunks.append(orjson.loads(line[6:]))
                    if stop_after is not None and len(chunks) >= stop_after:
                        break  # leaving the block closes the connection mid-stream
        return {"rid": rid, "chunks": chunks}

    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(
                stream(client, 0, 1500, stop_after=5),
                *(stream(client, i, full, stop_after=None) for i in (1, 2, 3)),
            )

    before = llama.metrics()["llamacpp:tokens_predicted_total"]
    cancelled, *finished = asyncio.run(run())
    for result in finished:
        usage = [c["usage"] for c in result["chunks"] if c.get("usage")]
        assert len(usage) == 1 and usage[0]["completion_tokens"] == full
        assert [
            c["choices"][0]["finish_reason"]
            for c in result["chunks"]
            if c["choices"] and c["choices"][0].get("finish_reason")
        ] == ["length"]
        record = _record(proxy, result["rid"])
        assert record["status"] == "ok" and record["completion_tokens"] == full
    deadline = time.monotonic() + 5
    record = _record(proxy, cancelled["rid"])
    while record["status"] != "cancelled" and time.monotonic() < deadline:
        time.sleep(0.02)
        record = _record(proxy, cancelled["rid"])
    assert record["status"] == "cancelled" and "client_disconnected" in record["flags"]
    assert 0 < record["completion_tokens"] < 1500
    # llama-server stopped the cancelled generation (every slot goes idle) and keeps serving.
    deadline = time.monotonic() + 5
    while any(slot.get("is_processing") for slot in httpx.get(f"{llama.url}/slots").json()):
        assert time.monotonic() < deadline, "llama-server kept generating for the cancelled stream"
        time.sleep(0.05)
    # It generated far fewer than the 1,500 tokens asked for the cancelled stream (a token takes about 1 ms).
    generated = llama.metrics()["llamacpp:tokens_predicted_total"] - before - 3 * full
    assert generated < 1000, generated
    assert httpx.get(f"{llama.url}/health").json() == {"status": "ok"}
    after = httpx.post(
        f"{proxy}/v1/chat/completions", json={"model": ALIAS, "messages": MSGS, "max_tokens": 8}
    )
    assert after.status_code == 200 and after.headers["x-scer-completion-tokens"] == "8"


# --- the server's own counters ---------------------------------------------------------------------


def test_proxy_token_totals_equal_llamacpp_metrics(llama: LlamaServer, proxy: str) -> None:
    """Sum of the proxy's records equals llama-server's Prometheus counters over the same requests."""
    before = llama.metrics()
    no_cache = {"cache_prompt": False}  # llama.cpp's prompt counter leaves out tokens reused from its cache
    bodies: list[tuple[str, dict[str, Any]]] = [
        ("chat/completions", {"messages": [{"role": "user", "content": "alpha"}], "max_tokens": 9}),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": "beta"}], "max_tokens": 7, "stream": True},
        ),
        ("completions", {"prompt": "gamma delta", "max_tokens": 5}),
        ("completions", {"prompt": "epsilon", "max_tokens": 6, "stream": True}),
    ]
    for path, body in bodies:
        assert (
            httpx.post(
                f"{proxy}/v1/{path}", json={"model": ALIAS, **body, **no_cache}, timeout=30
            ).status_code
            == 200
        )
    records = httpx.get(f"{proxy}/scer/requests?limit=10").json()["data"]
    assert len(records) == 4
    deadline = time.monotonic() + 5
    while True:
        after = llama.metrics()
        predicted = after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"]
        if predicted >= 27 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert sum(r["completion_tokens"] for r in records) == 27
    assert predicted == 27
    prompt = after["llamacpp:prompt_tokens_total"] - before["llamacpp:prompt_tokens_total"]
    assert sum(r["prompt_tokens"] for r in records) == prompt
    summary = httpx.get(f"{proxy}/scer/summary").json()
    assert summary["totals"]["completion_tokens"] == 27


def test_unmetered_llamacpp_endpoints_pass_through(llama: LlamaServer, proxy: str) -> None:
    models = httpx.get(f"{proxy}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [ALIAS]
    assert "x-scer-request-id" not in httpx.get(f"{proxy}/v1/models").headers
    body = {"model": ALIAS, "messages": MSGS, "max_tokens": 4}
    assert httpx.post(f"{proxy}/v1/chat/completions", json=body).status_code == 200
    assert httpx.get(f"{proxy}/scer/health").json()["status"] == "ok"


def test_model_size_comes_from_llamacpps_model_list(llama: LlamaServer) -> None:
    from scer_proxy.scer.benchmark import server_params_b

    listed = httpx.get(f"{llama.url}/v1/models", timeout=10).json()["data"]
    n_params = next(m for m in listed if m["id"] == ALIAS)["meta"]["n_params"]
    assert n_params > 0
    assert server_params_b(listed, ALIAS) == pytest.approx(n_params / 1e9)
