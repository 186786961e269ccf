"""The tokens of a request the upstream answers without usage are never counted on the event loop.

One 8 MB request that the upstream rejected froze the proxy for 14.8 s: with no usage to read, its
prompt was counted with cl100k in the handler. Now a prompt is counted in a worker thread, and one over
``tokens.PROMPT_TOKENIZE_MAX_BYTES`` of text is not tokenized at all: its count is an estimate from its
size, flagged ``prompt_estimated_from_bytes`` with ``estimate`` as the token source. A completion
without usage (and without the upstream's ``/tokenize``) is counted in a worker thread too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from scer_proxy.wire.tokens import PROMPT_TOKENIZE_MAX_BYTES, count_prompt
from tests.fake_upstream import MODEL
from tests.servers import ThreadedServers


def _chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def _record(proxy: str, rid: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while (resp := httpx.get(f"{proxy}/scer/requests/{rid}")).status_code != 200:
        assert time.monotonic() < deadline, "the record never reached the ledger"
        time.sleep(0.02)
    record: dict[str, Any] = resp.json()
    return record


class Pinger:
    """Asks ``/scer/health`` again and again from a thread and keeps the slowest answer's time."""

    def __init__(self, proxy: str) -> None:
        self.proxy = proxy
        self.slowest_s = 0.0
        self.pings = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.proxy, timeout=60) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                assert client.get("/scer/health").status_code == 200
                self.slowest_s = max(self.slowest_s, time.monotonic() - started)
                self.pings += 1
                time.sleep(0.01)

    def __enter__(self) -> Pinger:
        self._thread.start()
        while self.pings < 3:
            time.sleep(0.01)
        self.pings = 0
        self.slowest_s = 0.0
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(60)


# aiohttp's advice when the proxy forwards a body over 1 MiB as bytes (a ResourceWarning, ignored outside
# tests); the tests make every warning an error, which would fail the forward itself.
@pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning")
def test_a_huge_rejected_prompt_does_not_stall_other_requests(
    fake_upstream: str, start_proxy: Callable[..., str]
) -> None:
    # Spaces are cl100k's slowest text: 12 MB of them took this machine's loop about 9 s to count.
    content = " " * 12_000_000
    body = orjson.dumps(_chat(content))
    proxy = start_proxy(fake_upstream, server={"max_body_bytes": 32_000_000})
    with Pinger(proxy) as pinger:
        resp = httpx.post(
            f"{proxy}/v1/chat/completions",
            content=body,
            headers={"Content-Type": "application/json", "X-Fake-Scenario": "upstream-400"},
            timeout=120,
        )
        assert resp.status_code == 400
        record = _record(proxy, resp.headers["X-SCER-Request-Id"])
    assert pinger.pings > 0
    # Generous: a busy machine answers in milliseconds; tokenizing on the loop held every answer 9 s.
    assert pinger.slowest_s < 3.0, f"the event loop stalled {pinger.slowest_s:.1f} s"
    assert record["status"] == "upstream_error" and record["http_status"] == 400
    assert record["prompt_tokens"] == -(-(len(content) + len("user")) // 4)
    assert record["token_source"] == "estimate"
    assert "prompt_estimated_from_bytes" in record["flags"]
    assert "no_gpu_work" in record["flags"]


def test_a_long_prompt_under_the_cap_is_counted_exactly(
    fake_upstream: str, start_proxy: Callable[..., str]
) -> None:
    # Long enough to be counted in a worker thread, which the record waits for (it never blocks the loop).
    body = _chat("the river runs to the sea " * 8000)
    assert 100_000 < len(body["messages"][0]["content"]) < PROMPT_TOKENIZE_MAX_BYTES
    proxy = start_proxy(fake_upstream)
    with httpx.Client(base_url=proxy, timeout=30) as client:
        for scenario, status in (("upstream-400", 400), ("no-usage", 200)):
            resp = client.post("/v1/chat/completions", json=body, headers={"X-Fake-Scenario": scenario})
            assert resp.status_code == status
            record = _record(proxy, resp.headers["X-SCER-Request-Id"])
            assert record["prompt_tokens"] == count_prompt("chat", body)
            assert record["token_source"] == "tokenizer"
            assert "prompt_estimated_from_bytes" not in record["flags"]
        streamed = client.post(
            "/v1/chat/completions",
            json={**body, "stream": True},
            headers={"X-Fake-Scenario": "no-stream-usage"},
        )
        comment = orjson.loads(next(x for x in streamed.text.splitlines() if x.startswith(": scer "))[7:])
        assert comment["prompt_tokens"] == count_prompt("chat", body)
        assert comment["token_source"] == "tokenizer"


def test_a_prompt_over_the_cap_on_a_stream_without_usage_is_an_estimate(
    fake_upstream: str, start_proxy: Callable[..., str]
) -> None:
    content = "x" * (PROMPT_TOKENIZE_MAX_BYTES + 1000)
    proxy = start_proxy(fake_upstream)
    streamed = httpx.post(
        f"{proxy}/v1/chat/completions",
        json=_chat(content, stream=True),
        headers={"X-Fake-Scenario": "no-stream-usage"},
        timeout=30,
    )
    comment = orjson.loads(next(x for x in streamed.text.splitlines() if x.startswith(": scer "))[7:])
    assert comment["prompt_tokens"] == -(-(len(content) + len("user")) // 4)
    assert comment["token_source"] == "estimate"
    record = _record(proxy, streamed.headers["X-SCER-Request-Id"])
    assert record["status"] == "ok" and "prompt_estimated_from_bytes" in record["flags"]
    # With usage, the upstream's count stands, however long the prompt.
    with_usage = httpx.post(f"{proxy}/v1/chat/completions", json=_chat(content), timeout=30)
    assert with_usage.headers["X-SCER-Prompt-Tokens"] == "17"
    record = _record(proxy, with_usage.headers["X-SCER-Request-Id"])
    assert "prompt_estimated_from_bytes" not in record["flags"]


def test_a_cancelled_request_gets_the_exact_prompt_count(
    fake_upstream: str, start_proxy: Callable[..., str]
) -> None:
    # The client goes away before the answer (the handler is cancelled): the record still gets the
    # thread's exact count, not the size estimate.
    body = _chat("the river runs to the sea " * 8000)
    proxy = start_proxy(fake_upstream)
    with httpx.Client(base_url=proxy, timeout=0.5) as client:
        try:
            client.post(
                "/v1/chat/completions", json=body, headers={"X-Fake-Scenario": "slow", "X-Fake-Delay": "3"}
            )
        except httpx.ReadTimeout:
            pass
    deadline = time.monotonic() + 15
    while True:
        data = httpx.get(f"{proxy}/scer/requests?limit=1").json()["data"]
        if data and data[0]["status"] == "cancelled":
            break
        assert time.monotonic() < deadline, "the cancelled request's record never arrived"
        time.sleep(0.02)
    assert data[0]["prompt_tokens"] == count_prompt("chat", body)
    assert data[0]["token_source"] == "tokenizer"
    assert "client_disconnected" in data[0]["flags"]


def huge_answer_upstream() -> web.Application:
    """Answers every chat request with 8 MB of spaces (cl100k's slowest text) and no usage."""

    async def chat(request: web.Request) -> web.Response:
        await request.read()
        message = {"role": "assistant", "content": " " * 8_000_000}
        answer = {"id": "c", "object": "chat.completion", "created": 1700000000, "model": MODEL}
        choices = [{"index": 0, "message": message, "finish_reason": "stop"}]
        return web.Response(
            body=orjson.dumps({**answer, "choices": choices}), content_type="application/json"
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


@pytest.mark.filterwarnings("ignore:Sending a large body directly:ResourceWarning")
def test_a_huge_completion_without_usage_is_counted_off_the_loop(
    servers: ThreadedServers, start_proxy: Callable[..., str]
) -> None:
    # The completion of an answer without usage is counted too (no /tokenize here: cl100k), in a thread.
    upstream = servers.start(huge_answer_upstream)
    proxy = start_proxy(upstream)
    with Pinger(proxy) as pinger:
        resp = httpx.post(f"{proxy}/v1/chat/completions", json=_chat("hi"), timeout=300)
        assert resp.status_code == 200
    assert pinger.pings > 0
    assert pinger.slowest_s < 3.0, f"the event loop stalled {pinger.slowest_s:.1f} s"
    assert int(resp.headers["X-SCER-Completion-Tokens"]) > 0
    assert resp.headers["X-SCER-Token-Source"] == "tokenizer"
