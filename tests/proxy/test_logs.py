"""The canonical log line, read off a real ``scer-proxy serve`` process in front of the simulator.

One ``request`` line per metered request, with its id, tokens and energy; never the prompt, the
completion or the API key; none at ``--log-level warning``, where the line's fields are not even built.
"""

from __future__ import annotations

import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from scer_proxy.proxy.serving import free_port
from tests.servers import spawn_cli, wait_ready

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
PROMPT_MARKER = "purple-giraffe-4711"
API_KEY = "sk-test-secret-9f8e7d6c5b4a"


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    sim = spawn_cli(["simulate", "--listen", f"127.0.0.1:{port}", "--time-scale", "20"], tmp_path / "sim.log")
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1/models", sim, tmp_path / "sim.log")
        yield f"http://127.0.0.1:{port}"
    finally:
        sim.kill()
        sim.wait(10)


def run_proxy(sim_url: str, tmp_path: Path, *extra: str) -> tuple[str, subprocess.Popen[bytes], Path]:
    port = free_port()
    log = tmp_path / f"proxy-{port}.log"
    proxy = spawn_cli(
        [
            "serve",
            "--upstream",
            sim_url,
            "--meter",
            "simulated",
            "--db",
            str(tmp_path / f"{port}.db"),
            "--listen",
            f"127.0.0.1:{port}",
            *extra,
        ],
        log,
    )
    wait_ready(f"http://127.0.0.1:{port}/scer/health", proxy, log)
    return f"http://127.0.0.1:{port}", proxy, log


def traffic(url: str) -> tuple[dict[str, httpx.Headers], list[str]]:
    """A non-streamed and a streamed chat completion with a marked prompt and an API key, one the
    upstream refuses (its model is unknown there) and an unmetered request: the metered requests'
    headers by id, and the completions."""
    auth = {"Authorization": f"Bearer {API_KEY}"}
    messages = [{"role": "user", "content": f"Describe the {PROMPT_MARKER} in detail."}]
    metered: dict[str, httpx.Headers] = {}
    completions = []
    with httpx.Client(base_url=url, headers=auth, timeout=30.0) as client:
        resp = client.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 24}
        )
        assert resp.status_code == 200
        metered[resp.headers["X-SCER-Request-Id"]] = resp.headers
        completions.append(resp.json()["choices"][0]["message"]["content"])
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": MODEL, "messages": messages, "max_tokens": 24, "stream": True},
        ) as stream:
            assert stream.status_code == 200
            metered[stream.headers["X-SCER-Request-Id"]] = stream.headers
            text = []
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:]).get("choices", []):
                        text.append(choice.get("delta", {}).get("content") or "")
            completions.append("".join(text))
        refused = client.post("/v1/chat/completions", json={"model": "no-such-model", "messages": messages})
        assert refused.status_code == 404
        metered[refused.headers["X-SCER-Request-Id"]] = refused.headers
        assert client.get("/v1/models").status_code == 200
    return metered, completions


def stop_and_read(proxy: subprocess.Popen[bytes], log: Path) -> tuple[str, list[dict[str, Any]]]:
    proxy.send_signal(signal.SIGTERM)
    assert proxy.wait(20) == 0
    text = log.read_text()
    return text, [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_one_request_line_per_metered_request_without_prompt_completion_or_key(
    simulator: str, tmp_path: Path
) -> None:
    url, proxy, log = run_proxy(simulator, tmp_path)
    metered, completions = traffic(url)
    text, lines = stop_and_read(proxy, log)

    requests = {line["request_id"]: line for line in lines if line["event"] == "request"}
    assert sorted(requests) == sorted(metered) and len(requests) == 3
    for rid, line in requests.items():
        headers = metered[rid]
        assert line["level"] == "info" and line["energy_source"] == "simulated"
        assert line["tenant"].startswith("key-") and len(line["tenant"]) == 20
        assert line["duration_ms"] >= line["ttfb_ms"] > 0
        if line["model"] == "no-such-model":
            assert (line["status"], line["http_status"], line["completion_tokens"]) == (
                "upstream_error",
                404,
                0,
            )
            # Refused before any token: it used no GPU, and its energy is a real zero, said why.
            assert line["energy_j"] == 0 and "no_gpu_work" in line["flags"]
            continue
        assert line["energy_j"] > 0
        assert line["model"] == MODEL and (line["status"], line["http_status"]) == ("ok", 200)
        assert line["token_source"] == "upstream" and line["completion_tokens"] == 24
        if "X-SCER-Prompt-Tokens" in headers:  # the non-streamed one (a stream's figures come in its body)
            assert line["stream"] is False and line["chunks"] == 0
            assert str(line["prompt_tokens"]) == headers["X-SCER-Prompt-Tokens"]
        else:
            assert line["stream"] is True and line["chunks"] > 24
    # Never the prompt, the completion or the credential, in any line.
    assert all(len(c) > 40 for c in completions)
    for secret in (PROMPT_MARKER, API_KEY, *completions):
        assert secret not in text


def test_no_request_lines_at_warning_level(simulator: str, tmp_path: Path) -> None:
    url, proxy, log = run_proxy(simulator, tmp_path, "--log-level", "warning")
    metered, _ = traffic(url)
    assert len(metered) == 3
    _, lines = stop_and_read(proxy, log)
    assert not [line for line in lines if line["event"] == "request"]
