"""Pure wire helpers: SSE framing, usage shapes, the stream additions."""

from __future__ import annotations

import orjson
import pytest

from scer_proxy.wire import openai as wire


@pytest.mark.parametrize(
    ("event", "payload"),
    [
        (b'data: {"a":1}\n\n', b'{"a":1}'),
        (b"data: [DONE]\r\n\r\n", b"[DONE]"),
        (b"event: response.completed\ndata: {}\n\n", b"{}"),
        (b"data: a\ndata: b\n\n", b"a\nb"),
        (b"data:x\n\n", b"x"),
        (b": scer {}\n\n", None),
    ],
)
def test_event_payload(event: bytes, payload: bytes | None) -> None:
    assert wire.event_payload(event) == payload


def test_scanner_keeps_partial_events_across_reads() -> None:
    scanner = wire.SSEScanner()
    stream = b'data: {"x":1}\n\ndata: {"x":2}\r\n\r\ndata: [DONE]\n\n'
    events = []
    for i in range(0, len(stream), 5):
        events += scanner.feed(stream[i : i + 5])
    assert b"".join(events) == stream and len(events) == 3
    assert scanner.flush() == b""


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}, (3, 4)),
        ({"prompt_tokens": 9, "total_tokens": 9}, (9, 0)),  # embeddings
        ({"input_tokens": 5, "output_tokens": 2}, (5, 2)),  # responses
        (None, None),
        ({"completion_tokens": 4}, None),  # no prompt count: no usage
        ({"prompt_tokens": "3"}, "invalid"),  # a count that is not a number: not believed
    ],
)
def test_read_usage_shapes(usage: object, expected: tuple[int, int] | str | None) -> None:
    got = wire.read_usage(usage)
    if got is not None and not got.valid:
        assert expected == "invalid"
        return
    assert (None if got is None else (got.prompt_tokens, got.completion_tokens)) == expected


def test_strip_null_usage_keeps_every_other_byte() -> None:
    for event in (b'data: {"id":"x","choices":[],"usage":null}\n\n', b'data: {"usage": null, "id":"x"}\n\n'):
        stripped = wire.strip_null_usage(event)
        assert b"usage" not in stripped and orjson.loads(stripped[6:]) == {
            "id": "x",
            **({"choices": []} if b"choices" in event else {}),
        }


def test_usage_request_injection_keeps_client_options() -> None:
    body = {"model": "m", "stream": True, "stream_options": {"continuous_usage_stats": True}}
    sent = orjson.loads(wire.with_usage_requested(body))
    assert sent["stream_options"] == {"continuous_usage_stats": True, "include_usage": True}
    assert not wire.client_asked_usage(body) and wire.client_asked_usage(sent)


def test_comment_is_framed_like_the_stream() -> None:
    assert wire.scer_comment({"a": 1}, like=b"data: [DONE]\r\n\r\n").endswith(b"\r\n\r\n")
    assert wire.scer_comment({"a": 1}).startswith(b": scer {")
