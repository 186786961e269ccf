"""Pure helpers for the OpenAI wire format: no I/O, no aiohttp.

What metering needs to read from a request or response, and the few changes the proxy makes to a
stream: asking the upstream for usage, removing usage the client did not ask for, adding the
``usage.scer`` figures, and the ``: scer {json}`` comment before ``data: [DONE]``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

# Endpoint kinds that are metered, by path.
METERED_PATHS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "responses",
}

_USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,?')
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def metered_kind(method: str, path: str) -> str | None:
    """The endpoint kind of a metered request (``chat``, ``completions``, ...) or None."""
    if method != "POST":
        return None
    return METERED_PATHS.get(path.rstrip("/"))


def parse_json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, or None when it is not one (it is then forwarded untouched)."""
    if not body:
        return None
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> bytes:
    """An OpenAI error response body."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def wants_stream(body: dict[str, Any] | None) -> bool:
    return bool(body and body.get("stream") is True)


def client_asked_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def with_usage_requested(body: dict[str, Any]) -> bytes:
    """The request body re-serialized with ``stream_options.include_usage = true``."""
    options = body.get("stream_options")
    merged = {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
    return orjson.dumps({**body, "stream_options": merged})


# Token counts above this are not believed (``server.max_usage_tokens``, where the proxy reads it).
MAX_USAGE_TOKENS = 10_000_000


@dataclass(frozen=True)
class Usage:
    """Token counts read from an upstream's ``usage`` object (any of the OpenAI shapes).

    ``valid`` is False for a usage whose counts cannot be true (negative, above the limit, not whole
    numbers): the event still is a usage event for the stream's framing, but its counts are 0 and the
    proxy counts the tokens itself.
    """

    prompt_tokens: int
    completion_tokens: int
    valid: bool = True


def token_count(value: Any, max_tokens: int) -> int | None:
    """A usage count as an int, or None unless it is a whole number from 0 to ``max_tokens``.

    Bools are not counts; a float is taken only when it has no fraction (``17.0``).
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or not 0 <= value <= max_tokens:
        return None
    return value


def read_usage(usage: Any, max_tokens: int = MAX_USAGE_TOKENS) -> Usage | None:
    """Chat/completions (prompt/completion_tokens), embeddings (prompt/total), responses (input/output).

    None when there is no usage (no object, or no prompt count in it); an invalid :class:`Usage` when
    a count is there but is not a whole number from 0 to ``max_tokens`` (a missing completion count
    is 0: embeddings have none).
    """
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    if prompt is None:
        return None
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    prompt_count, completion_count = token_count(prompt, max_tokens), token_count(completion, max_tokens)
    if prompt_count is None or completion_count is None:
        return Usage(prompt_tokens=0, completion_tokens=0, valid=False)
    return Usage(prompt_tokens=prompt_count, completion_tokens=completion_count)


def trusted(usage: Usage | None) -> Usage | None:
    """The usage when its counts can be taken as they are, else None (the proxy counts the tokens)."""
    return usage if usage is not None and usage.valid else None


def response_text(kind: str, body: dict[str, Any]) -> str:
    """The generated text of a non-streamed response, for counting when usage is absent."""
    if kind == "chat":
        return "".join(
            str((c.get("message") or {}).get("content") or "")
            for c in body.get("choices") or []
            if isinstance(c, dict)
        )
    if kind == "completions":
        return "".join(str(c.get("text") or "") for c in body.get("choices") or [] if isinstance(c, dict))
    if kind == "responses":
        parts = []
        for item in body.get("output") or []:
            if isinstance(item, dict):
                for content in item.get("content") or []:
                    if isinstance(content, dict) and isinstance(content.get("text"), str):
                        parts.append(content["text"])
        return "".join(parts)
    return ""


def chunk_text(chunk: dict[str, Any]) -> str:
    """The text carried by one streamed chunk (chat delta, completion text or responses delta)."""
    choices = chunk.get("choices")
    if isinstance(choices, list):
        out = []
        for choice in choices:
            if isinstance(choice, dict):
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    out.append(str(delta.get("content") or ""))
                else:
                    out.append(str(choice.get("text") or ""))
        return "".join(out)
    if chunk.get("type") == "response.output_text.delta":
        return str(chunk.get("delta") or "")
    return ""


# The longest event terminator (``\r\n\r\n``) less one: the most of one a read can end with.
_SPLIT_TERMINATOR_BYTES = 3


@dataclass
class SSEScanner:
    """Splits a raw SSE byte stream into whole events as it arrives and reads each one.

    ``feed`` returns the complete events of a read, and keeps any incomplete tail for the next read;
    the relay forwards the events' bytes as they are, except the few it rewrites. Lines are never
    joined or re-framed: an event's bytes include its own terminator.

    Linear in the stream's length however it is split: the tail grows in place, and each read is
    searched only from where the last search ended (less the start of a terminator split across the
    two reads), so one long event that arrives in many reads is searched once, not once a read.
    """

    _tail: bytearray = field(default_factory=bytearray)

    def feed(self, data: bytes) -> list[bytes]:
        tail = self._tail
        if tail:
            pos = max(0, len(tail) - _SPLIT_TERMINATOR_BYTES)
            tail += data
            buf: bytes | bytearray = tail
        else:
            pos = 0
            buf = data
        events = []
        start = 0
        for match in _EVENT_END.finditer(buf, pos):
            events.append(bytes(buf[start : match.end()]))
            start = match.end()
        if buf is tail:
            del tail[:start]
        elif start < len(data):
            tail += memoryview(data)[start:]
        return events

    def flush(self) -> bytes:
        """Whatever incomplete event is left at the end of the stream."""
        tail = bytes(self._tail)
        self._tail.clear()
        return tail


def event_payload(event: bytes) -> bytes | None:
    """The joined ``data:`` field of an SSE event, or None for an event with no data (a comment)."""
    if event.startswith(b"data: "):
        # The common case, one ``data:`` line and its blank line: no splitting needed.
        body = event[6:].rstrip(b"\r\n")
        if b"\n" not in body and b"\r" not in body:
            return body
    data_lines = []
    for line in event.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            data_lines.append(value[1:] if value.startswith(b" ") else value)
    if not data_lines:
        return None
    return b"\n".join(data_lines)


def strip_null_usage(event: bytes) -> bytes:
    """Remove ``"usage": null`` that the upstream adds to every chunk once usage was requested."""
    for exact in (b',"usage":null', b', "usage": null'):  # compact (vLLM, orjson) and Python's json
        if exact in event:
            return event.replace(exact, b"", 1)
    return _USAGE_NULL.sub(b"", event, count=1)


def data_event(payload: dict[str, Any], like: bytes) -> bytes:
    """A ``data:`` event with ``payload``, terminated like the event it replaces."""
    return b"data: " + orjson.dumps(payload) + event_terminator(like)


def responses_completed_event(event: bytes, payload: dict[str, Any]) -> bytes:
    """A Responses API ``response.completed`` event rebuilt with a new data payload, event line kept."""
    lines = [line for line in event.splitlines() if line.startswith(b"event:")]
    end = event_terminator(event)
    newline = end[: len(end) // 2]
    prefix = b"".join(line + newline for line in lines)
    return prefix + b"data: " + orjson.dumps(payload) + end


def event_terminator(event: bytes) -> bytes:
    """The blank-line terminator an event uses (``\\n\\n``, ``\\r\\n\\r\\n`` or ``\\r\\r``)."""
    match = _EVENT_END.search(event)
    return match.group(0) if match else b"\n\n"


def scer_comment(figures: dict[str, Any], like: bytes = b"\n\n") -> bytes:
    """The SSE comment that carries the figures to a client that did not ask for usage, framed like ``like``."""
    return b": scer " + orjson.dumps(figures) + event_terminator(like)
