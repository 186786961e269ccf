"""A client that disconnects mid-stream cancels its upstream request at once; its record keeps the tokens seen."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import httpx
import orjson

from scer_proxy.sim import create_sim_app
from scer_proxy.wire.tokens import count_prompt
from tests.servers import ThreadedServers


def _open_stream(proxy: str, body: dict) -> tuple[socket.socket, bytes]:
    host, port = proxy.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    payload = orjson.dumps(body)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return sock, b""


def _wait(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_disconnect_cancels_upstream_within_one_engine_step(
    servers: ThreadedServers, start_proxy: Callable[..., str]
) -> None:
    # Real time (time_scale 1): a decode step of the 8B profile at batch 1 lasts about 7 ms.
    sim = servers.start(lambda: create_sim_app(time_scale=1.0), handler_cancellation=True)
    proxy = start_proxy(sim, meter={"kind": "simulated", "interval_ms": 20})
    model = httpx.get(f"{sim}/v1/models").json()["data"][0]["id"]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    sock, _ = _open_stream(proxy, body)
    received = b""
    while received.count(b"data: {") < 20:
        received += sock.recv(65536)
    head, _, stream = received.partition(b"\r\n\r\n")
    rid = next(
        line.split(b": ", 1)[1].decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"x-scer-request-id")
    )
    first = next(json.loads(line[6:]) for line in stream.split(b"\n") if line.startswith(b"data: {"))
    completion_id = first["id"]
    sock.close()  # the client goes away mid-stream

    def truth() -> dict:
        return httpx.get(f"{sim}/sim/truth/{completion_id}").json()

    _wait(lambda: truth()["status"] == "cancelled")
    seen = truth()
    assert seen["completion_tokens"] < 2000
    _wait(lambda: httpx.get(f"{proxy}/scer/requests/{rid}").status_code == 200)
    record = httpx.get(f"{proxy}/scer/requests/{rid}").json()
    assert record["status"] == "cancelled"
    assert "client_disconnected" in record["flags"]
    assert record["completion_tokens"] >= 19
    assert record["token_source"] == "tokenizer"
    assert record["prompt_tokens"] == count_prompt("chat", body)
    # Within one engine step: the engine produced at most a step or two more than the proxy relayed.
    assert seen["completion_tokens"] <= record["completion_tokens"] + 3
    assert record["energy_j"] is not None and record["energy_j"] > 0


def test_non_streamed_client_that_gives_up_cancels_the_upstream(
    servers: ThreadedServers, start_proxy: Callable[..., str]
) -> None:
    sim = servers.start(lambda: create_sim_app(time_scale=1.0), handler_cancellation=True)
    proxy = start_proxy(sim, meter={"kind": "simulated", "interval_ms": 20})
    model = httpx.get(f"{sim}/v1/models").json()["data"][0]["id"]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "long"}],
        "max_tokens": 3000,
        "ignore_eos": True,
    }
    try:
        httpx.post(f"{proxy}/v1/chat/completions", json=body, timeout=0.3)
    except httpx.ReadTimeout:
        pass
    else:
        raise AssertionError("the request should have outlived the client's timeout")

    def record() -> dict:
        data = httpx.get(f"{proxy}/scer/requests?limit=1").json()["data"]
        return data[0] if data else {}

    _wait(lambda: record().get("status") == "cancelled")
    assert "client_disconnected" in record()["flags"]
    # Cancelled after its prompt was sent, it used the GPU: it is not voided, and its figure settles.
    _wait(lambda: record()["settled"])
    assert record()["energy_j"] > 0 and "no_gpu_work" not in record()["flags"]
    # The simulator stopped the sequence, the proxy's timeline settles and lets go of it, and it keeps serving.
    _wait(lambda: httpx.get(f"{sim}/sim/energy").json()["active"] == 0)
    _wait(lambda: httpx.get(f"{proxy}/scer/health").json()["meter"]["upstreams"][0]["pending_requests"] == 0)
    ok = httpx.post(f"{proxy}/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=10)
    assert ok.status_code == 200
