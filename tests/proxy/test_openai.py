"""The official openai client, sync and async, streamed and not, through the proxy to the simulator."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from scer_proxy.sim import create_sim_app
from scer_proxy.wire.tokens import count_text
from tests.servers import ThreadedServers

MSGS = [{"role": "user", "content": "Tell me about rivers and the sea."}]
SCER_KEYS = {
    "request_id",
    "prompt_tokens",
    "completion_tokens",
    "token_source",
    "energy_j",
    "energy_source",
    "carbon_g",
    "carbon_operational_g",
    "carbon_embodied_g",
    "grid_intensity_g_per_kwh",
    "sci",
    "rating",
}


@pytest.fixture
def sim(servers: ThreadedServers) -> str:
    return servers.start(
        lambda: create_sim_app(time_scale=50.0, metrics_period_ms=100.0), handler_cancellation=True
    )


@pytest.fixture
def proxy(sim: str, start_proxy: Callable[..., str]) -> str:
    return start_proxy(sim, meter={"kind": "simulated", "interval_ms": 20})


@pytest.fixture
def model(sim: str) -> str:
    return httpx.get(f"{sim}/v1/models").json()["data"][0]["id"]


@pytest.fixture
def clients(sim: str, proxy: str) -> Iterator[tuple[openai.OpenAI, openai.OpenAI]]:
    direct = openai.OpenAI(base_url=f"{sim}/v1", api_key="sk-test", max_retries=0)
    via = openai.OpenAI(base_url=f"{proxy}/v1", api_key="sk-test", max_retries=0)
    yield direct, via
    direct.close()
    via.close()


def test_sync_non_streamed_same_content_and_token_headers(
    clients: tuple[openai.OpenAI, openai.OpenAI], model: str, proxy: str
) -> None:
    direct, via = clients
    d = direct.chat.completions.create(model=model, messages=MSGS, max_tokens=24)
    raw = via.chat.completions.with_raw_response.create(model=model, messages=MSGS, max_tokens=24)
    v = raw.parse()
    assert v.choices[0].message.content == d.choices[0].message.content
    assert v.usage is not None and d.usage is not None
    assert v.usage.model_dump() == d.usage.model_dump()
    assert raw.headers["x-scer-prompt-tokens"] == str(v.usage.prompt_tokens)
    assert raw.headers["x-scer-completion-tokens"] == str(v.usage.completion_tokens)
    assert raw.headers["x-scer-token-source"] == "upstream"
    assert raw.headers["x-scer-energy-source"] == "simulated"
    assert float(raw.headers["x-scer-energy-j"]) > 0
    assert float(raw.headers["x-scer-carbon-gco2e"]) == pytest.approx(
        float(raw.headers["x-scer-carbon-operational-gco2e"])
        + float(raw.headers["x-scer-carbon-embodied-gco2e"]),
        rel=1e-6,
    )
    assert raw.headers["x-scer-rating"] == "unrated"
    assert raw.headers["x-scer-model"] == model
    record = httpx.get(f"{proxy}/scer/requests/{raw.headers['x-scer-request-id']}").json()
    assert record["completion_tokens"] == v.usage.completion_tokens
    assert record["tenant"].startswith("key-") and "sk-test" not in str(record)


def test_completions_endpoint_through_the_proxy(
    clients: tuple[openai.OpenAI, openai.OpenAI], model: str
) -> None:
    direct, via = clients
    d = direct.completions.create(model=model, prompt="Once upon a time", max_tokens=12)
    raw = via.completions.with_raw_response.create(model=model, prompt="Once upon a time", max_tokens=12)
    v = raw.parse()
    assert v.choices[0].text == d.choices[0].text
    assert raw.headers["x-scer-completion-tokens"] == str(d.usage.completion_tokens)  # type: ignore[union-attr]


@pytest.mark.parametrize("include_usage", [True, False])
def test_sync_stream_same_content_usage_kept_or_stripped(
    clients: tuple[openai.OpenAI, openai.OpenAI], model: str, include_usage: bool, proxy: str
) -> None:
    direct, via = clients
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    d_chunks = list(
        direct.chat.completions.create(model=model, messages=MSGS, max_tokens=20, stream=True, **options)
    )
    with via.chat.completions.with_streaming_response.create(
        model=model, messages=MSGS, max_tokens=20, stream=True, **options
    ) as resp:
        rid = resp.headers["x-scer-request-id"]
        assert resp.headers["x-scer-model"] == model
        v_chunks = list(resp.parse())
    text = lambda cs: "".join(c.choices[0].delta.content or "" for c in cs if c.choices)  # noqa: E731
    assert text(v_chunks) == text(d_chunks)
    usage_chunks = [c for c in v_chunks if c.usage is not None]
    if include_usage:
        assert len(usage_chunks) == 1
        usage = usage_chunks[0].usage
        d_usage = next(c.usage for c in d_chunks if c.usage is not None)
        assert usage.prompt_tokens == d_usage.prompt_tokens  # type: ignore[union-attr]
        assert usage.completion_tokens == d_usage.completion_tokens  # type: ignore[union-attr]
        scer = usage.model_extra["scer"]  # type: ignore[union-attr,index]
        assert SCER_KEYS <= set(scer)
        assert scer["request_id"] == rid and scer["token_source"] == "upstream"
    else:
        assert usage_chunks == []
        assert all(c.choices for c in v_chunks)
    record = httpx.get(f"{proxy}/scer/requests/{rid}").json()
    assert record["completion_tokens"] == count_text(text(v_chunks))
    assert record["token_source"] == "upstream"  # asked of the upstream even when the client did not ask


def test_async_client_streamed_and_not(sim: str, proxy: str, model: str) -> None:
    async def run() -> None:
        direct = openai.AsyncOpenAI(base_url=f"{sim}/v1", api_key="sk-a", max_retries=0)
        via = openai.AsyncOpenAI(base_url=f"{proxy}/v1", api_key="sk-a", max_retries=0)
        d, v = await asyncio.gather(
            direct.chat.completions.create(model=model, messages=MSGS, max_tokens=16),
            via.chat.completions.create(model=model, messages=MSGS, max_tokens=16),
        )
        assert v.choices[0].message.content == d.choices[0].message.content
        assert v.usage == d.usage
        stream = await via.chat.completions.create(
            model=model, messages=MSGS, max_tokens=16, stream=True, stream_options={"include_usage": True}
        )
        chunks = [c async for c in stream]
        assert sum(1 for c in chunks if c.usage is not None) == 1
        results = await asyncio.gather(
            *(
                via.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=8
                )
                for i in range(16)
            )
        )
        assert all(r.usage is not None and r.usage.completion_tokens <= 8 for r in results)
        await direct.close()
        await via.close()

    asyncio.run(run())


def test_records_settle_against_the_next_reading(
    clients: tuple[openai.OpenAI, openai.OpenAI], model: str, proxy: str
) -> None:
    _direct, via = clients
    raw = via.chat.completions.with_raw_response.create(model=model, messages=MSGS, max_tokens=30)
    rid = raw.headers["x-scer-request-id"]
    header_j = float(raw.headers["x-scer-energy-j"])
    deadline = time.monotonic() + 5
    record = httpx.get(f"{proxy}/scer/requests/{rid}").json()
    while not record["settled"] and time.monotonic() < deadline:
        time.sleep(0.02)
        record = httpx.get(f"{proxy}/scer/requests/{rid}").json()
    assert record["settled"] is True
    assert record["energy_j"] > 0 and header_j > 0


def test_summary_totals_equal_the_sum_of_records(
    clients: tuple[openai.OpenAI, openai.OpenAI], model: str, proxy: str
) -> None:
    _direct, via = clients
    for i in range(6):
        via.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"n{i}"}], max_tokens=10
        )
    summary = httpx.get(f"{proxy}/scer/summary").json()
    records = httpx.get(f"{proxy}/scer/requests?limit=100").json()["data"]
    assert summary["totals"]["requests"] == len(records) == 6
    assert summary["totals"]["completion_tokens"] == sum(r["completion_tokens"] for r in records)
    assert summary["totals"]["energy_j"] == pytest.approx(sum(r["energy_j"] for r in records), rel=1e-9)
    assert summary["models"][0]["model"] == model
    assert summary["meter"]["kind"] == "simulated" and summary["meter"]["healthy"] is True
    assert summary["grid"]["source"].startswith("table:")
    deadline = time.monotonic() + 5  # /metrics counts a record once its figure is settled
    while httpx.get(f"{proxy}/scer/summary").json()["totals"]["settled_requests"] < 6:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    metrics = httpx.get(f"{proxy}/metrics").text
    assert f'scer_requests_total{{model="{model}",status="ok",upstream="up"}} 6.0' in metrics
