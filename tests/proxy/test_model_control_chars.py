"""A ``model`` holding a control character is answered 400 before anything is forwarded (issue 14).

The model is echoed in ``X-SCER-Model``: with a CR, LF or NUL in it the non-streamed client got no
HTTP response at all, while the ledger recorded a 200. The bodies are written as raw JSON bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.fake_upstream import RECEIVED
from tests.servers import ThreadedServers

MODELS = [
    r"fake-model\r\nX-Injected: 1",
    r"fake\nmodel",
    r"fake\rmodel",
    r"fake\u0000model",
    r"\u001b[31mred",
    r"tab\there",
    r"del\u007f",
    r"nel\u0085",
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", MODELS)
def test_a_model_with_a_control_character_is_400_and_not_forwarded(
    servers: ThreadedServers,
    fake_upstream: str,
    start_proxy: Callable[..., str],
    model: str,
    stream: bool,
) -> None:
    proxy = start_proxy(fake_upstream, meter={"kind": "estimate"})
    body = (
        b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", "content": "hi"}], '
        b'"stream": ' + (b"true" if stream else b"false") + b"}"
    )
    with httpx.Client(timeout=10) as client:
        resp = client.post(
            f"{proxy}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
        )
        assert resp.status_code == 400
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        assert (error["param"], error["code"]) == ("model", "invalid_model")
        assert client.get(f"{proxy}/scer/requests").json()["data"] == []  # nothing recorded
        assert client.get(f"{proxy}/scer/health").status_code == 200
    assert servers._runners[0].app[RECEIVED] == []  # never forwarded


def test_a_model_with_other_characters_is_served(fake_upstream: str, start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(fake_upstream, meter={"kind": "estimate"})
    body = '{"model": "fake-modèl 7B/中文", "messages": [{"role": "user", "content": "hi"}]}'.encode()
    resp = httpx.post(
        f"{proxy}/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 200 and resp.headers["x-scer-request-id"]
