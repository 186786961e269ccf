"""An upstream ``usage`` whose counts cannot be true is not believed: the proxy counts, and says so.

Negative counts used to be recorded as they came, with negative energy and carbon; counts near 2^62
made ``/scer/summary`` and ``/metrics`` answer 500 until the rows expired. Such a usage (negative,
above ``server.max_usage_tokens``, not a whole number, a bool) is now replaced by the tokenizer's
count, flagged ``upstream_usage_invalid``. The upstream is a fake with no ``/tokenize``, so the
counts are cl100k's; the meter is the estimate, whose energy follows the token counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from scer_proxy.wire.tokens import count_prompt, count_text
from tests.servers import ThreadedServers

MODEL = "usage-model"
ANSWER = "Rivers run to the sea."
WORDS = ["Rivers", " run", " to", " the", " sea", "."]
BODY: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "where do rivers go?"}]}
USAGE_HEADER = "X-Fake-Usage"  # the usage object the fake answers with, as JSON

INVALID_USAGES = [
    {"prompt_tokens": -5, "completion_tokens": 6, "total_tokens": 1},
    {"prompt_tokens": 17, "completion_tokens": -6, "total_tokens": 11},
    {"prompt_tokens": 2**62, "completion_tokens": 6, "total_tokens": 2**62 + 6},
    {"prompt_tokens": 2**63 - 1, "completion_tokens": 2**63 - 1, "total_tokens": 0},
    {"prompt_tokens": 17, "completion_tokens": 2**62, "total_tokens": 2**62 + 17},
    {"prompt_tokens": 10_000_001, "completion_tokens": 6, "total_tokens": 10_000_007},
    {"prompt_tokens": 17.5, "completion_tokens": 6, "total_tokens": 23.5},
    {"prompt_tokens": True, "completion_tokens": 6, "total_tokens": 7},
    {"prompt_tokens": "17", "completion_tokens": 6, "total_tokens": 23},
    {"prompt_tokens": 17, "completion_tokens": None, "total_tokens": 17},
]


def usage_upstream() -> web.Application:
    """A chat server that answers (whole or streamed) with the usage given in ``X-Fake-Usage``."""

    async def chat(request: web.Request) -> web.StreamResponse:
        parsed = orjson.loads(await request.read())
        usage = orjson.loads(request.headers[USAGE_HEADER])
        base = {"id": "chatcmpl-u", "created": 1700000000, "model": MODEL}
        if not parsed.get("stream"):
            message = {"role": "assistant", "content": ANSWER}
            return web.json_response(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": usage,
                },
                dumps=lambda value: orjson.dumps(value).decode(),
            )
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        chunk = {**base, "object": "chat.completion.chunk"}
        for word in WORDS:
            choice = {"index": 0, "delta": {"content": word}, "finish_reason": None}
            await out.write(b"data: " + orjson.dumps({**chunk, "choices": [choice]}) + b"\n\n")
        finish = {"index": 0, "delta": {}, "finish_reason": "stop"}
        await out.write(b"data: " + orjson.dumps({**chunk, "choices": [finish]}) + b"\n\n")
        await out.write(b"data: " + orjson.dumps({**chunk, "choices": [], "usage": usage}) + b"\n\n")
        await out.write(b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


def _record(proxy: str, rid: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while (resp := httpx.get(f"{proxy}/scer/requests/{rid}")).status_code != 200:
        assert time.monotonic() < deadline, "the record never reached the ledger"
        time.sleep(0.02)
    record: dict[str, Any] = resp.json()
    return record


def _post(proxy: str, usage: dict[str, Any], *, stream: bool, asked: bool = False) -> httpx.Response:
    body = {**BODY, "stream": True, **({"stream_options": {"include_usage": True}} if asked else {})}
    resp = httpx.post(
        f"{proxy}/v1/chat/completions",
        json=body if stream else BODY,
        headers={USAGE_HEADER: orjson.dumps(usage).decode()},
        timeout=10,
    )
    assert resp.status_code == 200
    return resp


def _assert_counted_by_the_proxy(record: dict[str, Any]) -> None:
    assert record["prompt_tokens"] == count_prompt("chat", BODY)
    assert record["completion_tokens"] == count_text(ANSWER)
    assert record["token_source"] == "tokenizer"
    assert "upstream_usage_invalid" in record["flags"]
    for name in ("energy_j", "carbon_g", "carbon_operational_g", "carbon_embodied_g", "sci"):
        value = record[name]
        assert value is not None and math.isfinite(value) and value >= 0, (name, value)
    assert record["energy_j"] > 0  # the estimate from the counted tokens


@pytest.mark.parametrize(
    "usage", INVALID_USAGES, ids=lambda u: repr(u["prompt_tokens"]) + "/" + repr(u["completion_tokens"])
)
def test_invalid_usage_is_replaced_by_the_proxys_count(
    servers: ThreadedServers, start_proxy: Callable[..., str], usage: dict[str, Any]
) -> None:
    upstream = servers.start(usage_upstream)
    proxy = start_proxy(upstream, meter={"kind": "estimate"})
    whole = _post(proxy, usage, stream=False)
    streamed = _post(proxy, usage, stream=True)
    asked = _post(proxy, usage, stream=True, asked=True)
    records = [_record(proxy, resp.headers["X-SCER-Request-Id"]) for resp in (whole, streamed, asked)]

    # Nothing absurd reached the ledger: every read of it answers (2^62 used to make these 500).
    for path in ("/scer/summary", "/metrics", "/scer/requests?limit=10"):
        assert httpx.get(f"{proxy}{path}", timeout=10).status_code == 200, path
    totals = httpx.get(f"{proxy}/scer/summary", timeout=10).json()["totals"]
    assert totals["requests"] == 3
    assert totals["prompt_tokens"] == 3 * count_prompt("chat", BODY)
    assert totals["energy_j"] >= 0 and totals["carbon_g"] >= 0

    for record in records:
        _assert_counted_by_the_proxy(record)
    assert whole.headers["X-SCER-Prompt-Tokens"] == str(count_prompt("chat", BODY))
    assert whole.headers["X-SCER-Token-Source"] == "tokenizer"
    assert whole.json()["usage"] == usage  # the client gets the upstream's body as it came
    # The client did not ask for usage: the usage chunk is dropped, the figures come as a comment.
    assert '"usage"' not in streamed.text
    comment = orjson.loads(next(x for x in streamed.text.splitlines() if x.startswith(": scer "))[7:])
    assert comment["prompt_tokens"] == count_prompt("chat", BODY)
    assert comment["completion_tokens"] == count_text(ANSWER)
    # The client asked: the upstream's usage chunk carries the proxy's figures.
    usage_chunk = orjson.loads(next(x for x in asked.text.splitlines() if '"usage"' in x)[6:])
    assert usage_chunk["usage"]["scer"]["prompt_tokens"] == count_prompt("chat", BODY)
    assert usage_chunk["usage"]["scer"]["token_source"] == "tokenizer"


def test_whole_counts_within_the_limit_are_believed(
    servers: ThreadedServers, start_proxy: Callable[..., str]
) -> None:
    upstream = servers.start(usage_upstream)
    proxy = start_proxy(upstream, meter={"kind": "estimate"}, server={"max_usage_tokens": 1000})
    for usage, prompt in (
        ({"prompt_tokens": 17.0, "completion_tokens": 6}, 17),
        ({"prompt_tokens": 1000}, 1000),
    ):
        record = _record(proxy, _post(proxy, usage, stream=False).headers["X-SCER-Request-Id"])
        assert (record["prompt_tokens"], record["token_source"]) == (prompt, "upstream")
        assert "upstream_usage_invalid" not in record["flags"]
    # Over the configured limit (1,000 here): not believed.
    over = _record(proxy, _post(proxy, {"prompt_tokens": 1001}, stream=True).headers["X-SCER-Request-Id"])
    assert over["prompt_tokens"] == count_prompt("chat", BODY)
    assert "upstream_usage_invalid" in over["flags"]
