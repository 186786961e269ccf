"""The simulator over real sockets, through the official openai client and raw httpx."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from scer_proxy.sim import TRUE_ENERGY_HEADER, create_sim_app, get_profile, serve_simulator
from scer_proxy.wire import tokens
from tests.servers import ThreadedServers

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name three rivers of Europe, with one fact each.", "name": "ada"},
]
PROMPT = "Once upon a time, in a land of rivers and mountains,"


# One client for the whole module: building an httpx client (its TLS context) costs tens of ms.
HTTP = httpx.Client(timeout=30.0)


class ManualClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(autouse=True)
def no_server_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Disconnects and injected faults must not make aiohttp log handler errors."""
    caplog.set_level(logging.WARNING)
    yield
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]


@pytest.fixture(scope="module")
def sim_servers() -> Iterator[ThreadedServers]:
    ts = ThreadedServers()
    yield ts
    ts.close()
    HTTP.close()


@pytest.fixture(scope="module")
def sim_url(sim_servers: ThreadedServers) -> str:
    return sim_servers.start(lambda: create_sim_app(time_scale=200.0, seed=3))


def sync_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="sk-sim", max_retries=0)


def sse_events(lines: Iterator[str]) -> list[Any]:
    """The ``data:`` payloads of an SSE stream (``[DONE]`` kept as a string)."""
    events: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return events


def energy(url: str) -> dict[str, Any]:
    result: dict[str, Any] = HTTP.get(url + "/sim/energy").json()
    return result


def truth(url: str, completion_id: str) -> dict[str, Any]:
    response = HTTP.get(f"{url}/sim/truth/{completion_id}")
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


def test_chat_non_streamed_usage_text_and_true_energy(sim_url: str) -> None:
    client = sync_client(sim_url)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, max_tokens=40)
    completion = raw.parse()
    assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"
    assert completion.model == MODEL
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == tokens.count_prompt("chat", {"messages": MESSAGES})
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert tokens.count_text(choice.message.content or "") == completion.usage.completion_tokens <= 40
    assert (
        completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    record = truth(sim_url, completion.id)
    assert record["status"] == "finished"
    assert record["completion_tokens"] == completion.usage.completion_tokens
    assert record["prompt_tokens"] == completion.usage.prompt_tokens
    assert float(raw.headers[TRUE_ENERGY_HEADER]) == pytest.approx(record["energy_j"], abs=1e-8)
    assert record["energy_j"] == pytest.approx(record["prefill_energy_j"] + record["decode_energy_j"])
    assert record["prefill_energy_j"] > 0 and record["decode_energy_j"] > 0
    assert record["arrived_s"] <= record["first_token_s"] <= record["finished_s"]


def test_ignore_eos_gives_exactly_max_tokens_and_same_text_streamed(sim_url: str) -> None:
    client = sync_client(sim_url)
    body: dict[str, Any] = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 123,
        "extra_body": {"ignore_eos": True},
    }
    plain = client.completions.create(**body)
    assert plain.id.startswith("cmpl-") and plain.object == "text_completion"
    assert plain.usage is not None and plain.usage.completion_tokens == 123
    assert plain.usage.prompt_tokens == tokens.count_prompt("completions", {"prompt": PROMPT})
    assert plain.choices[0].finish_reason == "length"
    assert tokens.count_text(plain.choices[0].text) == 123
    streamed = client.completions.create(**body, stream=True)
    text = "".join(chunk.choices[0].text for chunk in streamed if chunk.choices)
    assert text == plain.choices[0].text  # deterministic from the seed and the body


async def test_async_chat_stream_with_usage(sim_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=sim_url + "/v1", api_key="sk-sim", max_retries=0)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=60,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    await client.close()
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason] in (
        ["stop"],
        ["length"],
    )
    assert usage_chunk.usage.prompt_tokens == tokens.count_prompt("chat", {"messages": MESSAGES})
    assert tokens.count_text(content) == usage_chunk.usage.completion_tokens
    # one chunk per token, plus the role chunk and the finish chunk
    assert len(chunks) == usage_chunk.usage.completion_tokens + 3
    assert len({c.id for c in chunks}) == 1


async def test_async_non_streamed_completion(sim_url: str) -> None:
    async with openai.AsyncOpenAI(base_url=sim_url + "/v1", api_key="sk-sim", max_retries=0) as client:
        completion = await client.completions.create(model=MODEL, prompt=[PROMPT], max_tokens=30)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == tokens.count_prompt("completions", {"prompt": [PROMPT]})
    assert tokens.count_text(completion.choices[0].text) == completion.usage.completion_tokens <= 30


@pytest.mark.parametrize("include_usage", [True, False, None])
def test_stream_wire_format(sim_url: str, include_usage: bool | None) -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": MESSAGES, "max_tokens": 8, "stream": True}
    if include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}
    with HTTP.stream("POST", sim_url + "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    assert all(block.startswith("data: ") for block in raw.split("\n\n") if block)
    events = sse_events(iter(raw.split("\n\n")))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    if include_usage:
        assert all(c["usage"] is None for c in chunks[:-1])
        assert chunks[-1]["choices"] == [] and set(chunks[-1]["usage"]) == {
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
        }
        chunks = chunks[:-1]
    else:
        assert all("usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["delta"] == {} and chunks[-1]["choices"][0]["finish_reason"] in (
        "stop",
        "length",
    )
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_usage_on_streams_can_be_turned_off(sim_servers: ThreadedServers) -> None:
    url = sim_servers.start(lambda: create_sim_app(time_scale=200.0, usage_on_streams=False))
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = HTTP.post(url + "/v1/completions", json=body)
    events = sse_events(iter(response.text.split("\n\n")))
    assert events[-1] == "[DONE]"
    assert all("usage" not in e and e["choices"] for e in events[:-1])


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    result: dict[str, Any] = body["error"]
    return result


def test_errors_use_the_openai_shape(sim_url: str) -> None:
    chat = sim_url + "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    error_of(HTTP.post(chat, content=b'{"model": ', headers=headers), 400)
    error_of(HTTP.post(chat, content=b"[1, 2]", headers=headers), 400)
    assert error_of(HTTP.post(chat, json={"model": MODEL}), 400)["param"] == "messages"
    assert error_of(HTTP.post(chat, json={"messages": MESSAGES}), 400)["param"] == "model"
    bad = {"model": MODEL, "messages": MESSAGES, "max_tokens": "ten"}
    assert error_of(HTTP.post(chat, json=bad), 400)["param"] == "max_tokens"
    bad = {"model": MODEL, "messages": MESSAGES, "stream": "yes"}
    assert error_of(HTTP.post(chat, json=bad), 400)["param"] == "stream"
    bad = {"model": MODEL, "messages": "hello"}
    assert error_of(HTTP.post(chat, json=bad), 400)["param"] == "messages"
    assert (
        error_of(HTTP.post(sim_url + "/v1/completions", json={"model": MODEL, "prompt": 5}), 400)["param"]
        == "prompt"
    )
    unknown = error_of(HTTP.post(chat, json={"model": "gpt-9", "messages": MESSAGES}), 404)
    assert unknown["code"] == "model_not_found"
    too_long = {"model": MODEL, "messages": MESSAGES, "max_tokens": get_profile().max_model_len}
    overflow = error_of(HTTP.post(chat, json=too_long), 400)
    assert overflow["code"] == "context_length_exceeded" and overflow["type"] == "invalid_request_error"


def test_errors_through_the_openai_client(sim_url: str) -> None:
    client = sync_client(sim_url)
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="nope", messages=MESSAGES)
    assert not_found.value.status_code == 404 and not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10**6)
    assert bad.value.code == "context_length_exceeded"


def test_models_lists_the_profile_model(sim_url: str) -> None:
    models = sync_client(sim_url).models.list().data
    assert [m.id for m in models] == [MODEL] and models[0].owned_by == "scer-sim"
    raw = HTTP.get(sim_url + "/v1/models").json()
    assert raw["object"] == "list" and raw["data"][0]["max_model_len"] == get_profile().max_model_len


def test_tokenize_counts_like_the_proxy_tokenizer(sim_servers: ThreadedServers, sim_url: str) -> None:
    for body, kind in (
        ({"model": MODEL, "prompt": PROMPT}, "completions"),
        ({"model": MODEL, "messages": MESSAGES}, "chat"),
        ({"model": MODEL, "prompt": [1, 2, 3, 4]}, "completions"),
    ):
        result = HTTP.post(sim_url + "/tokenize", json=body).json()
        assert result["count"] == len(result["tokens"]) == tokens.count_prompt(kind, body)
        assert result["max_model_len"] == get_profile().max_model_len
    assert HTTP.post(sim_url + "/tokenize", json={"model": "other", "prompt": "x"}).status_code == 404
    url = sim_servers.start(lambda: create_sim_app(tokenize_endpoint=False))
    assert HTTP.post(url + "/tokenize", json={"model": MODEL, "prompt": PROMPT}).status_code == 404


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """A small Prometheus text parser: metric name -> [(labels, value)]; checks HELP/TYPE lines."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    typed: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            typed[name] = kind
            continue
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, rest = head.partition("{")
        labels = dict(part.split("=", 1) for part in rest.rstrip("}").split(",")) if rest else {}
        samples.setdefault(name, []).append(({k: v.strip('"') for k, v in labels.items()}, float(value)))
    assert typed == {"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": "counter", "DCGM_FI_DEV_POWER_USAGE": "gauge"}
    return samples


def test_metrics_refresh_at_the_period_with_exact_values(sim_servers: ThreadedServers) -> None:
    clock = ManualClock()
    url = sim_servers.start(lambda: create_sim_app(clock=clock, metrics_period_ms=100.0))
    idle_w = get_profile().idle_power_w

    def energy_mj() -> float:
        samples = parse_metrics(HTTP.get(url + "/metrics").text)
        ((labels, value),) = samples["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"]
        assert labels["gpu"] == "0" and labels["UUID"].startswith("GPU-sim-")
        assert labels["modelName"] == "NVIDIA H100 80GB HBM3" and labels["Hostname"] == "scer-sim"
        ((_, power_w),) = samples["DCGM_FI_DEV_POWER_USAGE"]
        assert power_w == pytest.approx(idle_w)
        return value

    assert energy_mj() == 0
    clock.t = 0.099
    assert energy_mj() == 0  # not refreshed inside the period
    assert energy(url)["counter_j"] == pytest.approx(idle_w * 0.099)  # while the live counter moved
    clock.t = 0.1
    assert energy_mj() == pytest.approx(idle_w * 100, abs=1)
    clock.t = 0.35
    assert energy_mj() == pytest.approx(idle_w * 300, abs=1)


def test_metrics_split_over_gpus_and_counter_is_monotonic(sim_servers: ThreadedServers) -> None:
    profile = get_profile("llama-3.1-70b-h100x4")
    url = sim_servers.start(lambda: create_sim_app(profile, time_scale=100.0, metrics_period_ms=20.0))
    client = sync_client(url)
    last = -1.0
    for _ in range(4):
        stream = client.chat.completions.create(
            model=profile.model_id,
            messages=MESSAGES,
            max_tokens=30,
            stream=True,
        )
        for _chunk in stream:
            samples = parse_metrics(HTTP.get(url + "/metrics").text)
            counters = samples["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"]
            assert [labels["gpu"] for labels, _ in counters] == ["0", "1", "2", "3"]
            assert len({labels["UUID"] for labels, _ in counters}) == 4
            values = [value for _, value in counters]
            assert max(values) - min(values) == 0  # split evenly
            assert values[0] >= last
            last = values[0]
    state = energy(url)
    assert last * 4 / 1000.0 <= state["counter_j"]
    assert state["counter_j"] == pytest.approx(state["attributed_j"] + state["idle_j"], rel=1e-9)


def test_concurrent_requests_batch_and_conserve_energy(sim_servers: ThreadedServers) -> None:
    import concurrent.futures

    url = sim_servers.start(lambda: create_sim_app(time_scale=100.0))
    client = sync_client(url)

    def one(i: int) -> tuple[str, int]:
        completion = client.completions.create(
            model=MODEL, prompt=f"{PROMPT} {i}", max_tokens=40 + i, extra_body={"ignore_eos": True}
        )
        assert completion.usage is not None
        return completion.id, completion.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    assert [n for _, n in results] == [40 + i for i in range(16)]
    truths = [truth(url, cid) for cid, _ in results]
    state = energy(url)
    assert state["active"] == state["waiting"] == 0 and state["steps"] > 0
    assert state["steps"] < sum(n for _, n in results)  # tokens were produced in shared steps
    assert state["attributed_j"] == pytest.approx(sum(t["energy_j"] for t in truths), rel=1e-9)
    assert state["counter_j"] == pytest.approx(state["attributed_j"] + state["idle_j"], rel=1e-9)


def test_faults_429_500_and_drop(sim_servers: ThreadedServers) -> None:
    url = sim_servers.start(lambda: create_sim_app(time_scale=200.0, faults={"status_500": 1}))
    client = sync_client(url)
    with pytest.raises(openai.InternalServerError) as server_error:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5)
    assert server_error.value.status_code == 500 and server_error.value.type == "server_error"
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5).usage is not None

    state = HTTP.post(url + "/sim/faults", json={"status_429": 2, "drop": 1}).json()
    assert state == {"status_429": 2, "status_500": 0, "drop": 1, "drop_after_chunks": 0}
    for _ in range(2):
        response = HTTP.post(
            url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 5}
        )
        assert error_of(response, 429)["code"] == "rate_limit_exceeded"
        assert response.headers["Retry-After"] == "1"
    with pytest.raises(openai.APIConnectionError):
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5)
    assert HTTP.get(url + "/sim/faults").json() == {
        "status_429": 0,
        "status_500": 0,
        "drop": 0,
        "drop_after_chunks": 0,
    }
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5).usage is not None
    assert HTTP.post(url + "/sim/faults", json={"explode": 1}).status_code == 400
    assert HTTP.post(url + "/sim/faults", json={"drop": -1}).status_code == 400


def test_drop_mid_stream_after_chunks(sim_servers: ThreadedServers) -> None:
    # Real time and a long completion (5,000 steps of about 15 ms): the drop after three chunks comes more
    # than a minute before the sequence could finish, however slowly a busy machine runs this process.
    # (At 200 x, 50 tokens took under 5 ms of wall time and a loaded machine let the engine finish them
    # before the handler closed the connection: status "finished", not "cancelled".)
    url = sim_servers.start(
        lambda: create_sim_app(time_scale=1.0, faults={"drop": 1, "drop_after_chunks": 3})
    )
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 5000, "stream": True, "ignore_eos": True}
    received: list[dict[str, Any]] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        HTTP.stream("POST", url + "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                received.append(orjson.loads(line[6:]))
    assert len(received) == 3  # the role chunk and two tokens
    assert received[0]["choices"][0]["delta"]["role"] == "assistant"
    record = wait_for_status(url, received[0]["id"], "cancelled")
    assert 2 <= record["completion_tokens"] < 5000


def wait_for_status(url: str, completion_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10.0
    while True:
        record = truth(url, completion_id)
        if record["status"] == status or time.monotonic() > deadline:
            assert record["status"] == status
            return record
        time.sleep(0.01)


def test_client_disconnect_mid_stream_cancels_within_one_step(sim_servers: ThreadedServers) -> None:
    url = sim_servers.start(lambda: create_sim_app(time_scale=0.5))  # about 15 ms a step at batch 1
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5000, "stream": True, "ignore_eos": True}
    received = 0
    completion_id = ""
    with HTTP.stream("POST", url + "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                chunk = orjson.loads(line[6:])
                completion_id = chunk["id"]
                received += len(chunk["choices"][0]["text"] and [1])
                if received == 5:
                    break
    record = wait_for_status(url, completion_id, "cancelled")
    assert received <= record["completion_tokens"] <= received + 2
    assert record["finished_s"] is not None and record["energy_j"] > 0
    state = energy(url)
    assert state["active"] == 0
    assert state["counter_j"] == pytest.approx(state["attributed_j"] + state["idle_j"], rel=1e-9)


def test_truth_unknown_id_is_404(sim_url: str) -> None:
    error_of(HTTP.get(sim_url + "/sim/truth/chatcmpl-nope"), 404)


def test_max_completion_tokens_wins_for_chat(sim_url: str) -> None:
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 90,
        "max_completion_tokens": 7,
        "ignore_eos": True,
    }
    completion = HTTP.post(sim_url + "/v1/chat/completions", json=body).json()
    assert completion["usage"]["completion_tokens"] == 7
    assert completion["choices"][0]["finish_reason"] == "length"


def test_non_streamed_client_that_gives_up_cancels_the_request(sim_servers: ThreadedServers) -> None:
    url = sim_servers.start(lambda: create_sim_app(time_scale=1.0))
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 20000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        HTTP.post(url + "/v1/completions", json=body, timeout=0.1)
    deadline = time.monotonic() + 10.0
    while (state := energy(url))["active"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert state["active"] == 0 and state["waiting"] == 0
    assert state["attributed_j"] > 0
    assert state["counter_j"] == pytest.approx(state["attributed_j"] + state["idle_j"], rel=1e-9)


async def test_serve_simulator_logs_one_line_and_stops_when_cancelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="scer_proxy.sim")
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve_simulator(
            "127.0.0.1",
            0,
            profile=get_profile("llama-3.1-70b-h100x4"),
            time_scale=50.0,
            on_ready=ready.set_result,
        )
    )
    url = await asyncio.wait_for(ready, 10)
    async with httpx.AsyncClient() as client:
        models = (await client.get(url + "/v1/models")).json()
    assert models["data"][0]["id"] == "meta-llama/Llama-3.1-70B-Instruct"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    lines = [r.getMessage() for r in caplog.records if r.name == "scer_proxy.sim"]
    assert len(lines) == 1
    started = orjson.loads(lines[0])
    assert started["event"] == "simulator.started" and started["url"] == url
    assert started["profile"] == "llama-3.1-70b-h100x4"


@pytest.mark.parametrize("which", ["simulator", "proxy"])
async def test_servers_load_the_tokenizer_at_start_up_not_on_the_first_request(which: str) -> None:
    # Loading takes a few hundred ms; on the first request it would stall the event loop and every
    # request behind it (the opening burst reached the simulated GPU about 270 ms late).
    from scer_proxy.app import create_app
    from scer_proxy.proxy.serving import serve_app
    from scer_proxy.wire import tokens
    from tests.conftest import proxy_config

    tokens.encoding.cache_clear()
    app = create_sim_app() if which == "simulator" else create_app(proxy_config("http://127.0.0.1:9"))
    runner, _url = await serve_app(app)
    try:
        assert tokens.encoding.cache_info().currsize == 1
    finally:
        await runner.cleanup()
