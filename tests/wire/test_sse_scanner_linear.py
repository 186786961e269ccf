"""The SSE scanner does a linear amount of work however the stream is split, and frames it the same.

One 16 MB event arriving in many reads used to be re-joined and searched from its start at every read
(41.7 s through the proxy against 0.08 s direct). The scanner's searches are counted by wrapping its
terminator pattern: each search is charged the bytes it may look at (from its start position to the
end of the buffer), which is what the old rescanning made quadratic.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from scer_proxy.wire import openai as wire


class CountingPattern:
    """The scanner's terminator pattern, counting the bytes each search is handed."""

    def __init__(self, pattern: re.Pattern[bytes]) -> None:
        self.pattern = pattern
        self.scanned_bytes = 0

    def finditer(self, buf: Any, pos: int = 0) -> Iterator[re.Match[bytes]]:
        self.scanned_bytes += len(buf) - pos
        return self.pattern.finditer(buf, pos)

    def search(self, buf: Any, pos: int = 0) -> re.Match[bytes] | None:
        self.scanned_bytes += len(buf) - pos
        return self.pattern.search(buf, pos)


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> CountingPattern:
    pattern = CountingPattern(wire._EVENT_END)
    monkeypatch.setattr(wire, "_EVENT_END", pattern)
    return pattern


def _feed(scanner: wire.SSEScanner, stream: bytes, piece: int) -> list[bytes]:
    events = []
    for i in range(0, len(stream), piece):
        events += scanner.feed(stream[i : i + piece])
    return events


def test_one_long_event_in_many_reads_is_searched_once(counting: CountingPattern) -> None:
    event = b'data: {"x":"' + b"a" * 400_000 + b'"}\n\n'
    piece = 1000
    reads = -(-len(event) // piece)
    events = _feed(wire.SSEScanner(), event, piece)
    assert events == [event]
    # Each byte once, plus at most the 3 bytes of a split terminator again at each read. Rescanning the
    # whole unfinished event at each read is about reads / 2 times the event (here 80 MB).
    assert counting.scanned_bytes <= len(event) + 3 * reads


def test_many_events_across_reads_are_searched_once(counting: CountingPattern) -> None:
    stream = b"".join(b'data: {"i":%d,"pad":"%s"}\n\n' % (i, b"p" * (i % 50)) for i in range(5000))
    piece = 7
    events = _feed(wire.SSEScanner(), stream, piece)
    assert b"".join(events) == stream and len(events) == 5000
    assert counting.scanned_bytes <= len(stream) + 3 * -(-len(stream) // piece)


def test_one_long_event_in_many_reads_takes_about_as_long_as_one_read() -> None:
    # The copy of the unfinished event at each read was quadratic too: 2 MB in 1 KB reads took seconds.
    event = b"data: " + b"b" * 2_000_000 + b"\n\n"
    started = time.perf_counter()
    events = _feed(wire.SSEScanner(), event, 1024)
    elapsed_s = time.perf_counter() - started
    assert events == [event]
    assert elapsed_s < 2.0  # linear: a few milliseconds; quadratic: 2,000 copies of up to 2 MB


@pytest.mark.parametrize("terminator", [b"\n\n", b"\r\n\r\n", b"\r\r"])
@pytest.mark.parametrize("piece", [1, 2, 3, 4, 5, 7, 64])
def test_framing_is_the_same_however_the_stream_is_split(terminator: bytes, piece: int) -> None:
    newline = terminator[: len(terminator) // 2]
    events = [
        b'data: {"a":1}' + terminator,
        b"event: x" + newline + b'data: {"b":2}' + terminator,
        b": comment" + terminator,
        b"data: " + b"z" * 300 + terminator,
        b"data: [DONE]" + terminator,
    ]
    stream = b"".join(events)
    scanner = wire.SSEScanner()
    assert _feed(scanner, stream, piece) == events
    assert scanner.flush() == b""


def test_mixed_terminators_split_at_every_byte_frame_as_in_one_read() -> None:
    stream = (
        b"data: 1\n\ndata: 2\r\n\r\ndata: 3\r\rdata: 4\n\r\n\r\ndata: 5\r\n\r\r\n\n: c\n\n" + b"data: tail"
    )
    whole = wire.SSEScanner()
    expected = whole.feed(stream)
    assert len(expected) == 7 and whole.flush() == b"data: tail"
    for piece in range(1, 12):
        scanner = wire.SSEScanner()
        assert _feed(scanner, stream, piece) == expected, piece
        assert scanner.flush() == b"data: tail"


def test_a_terminator_split_between_two_reads_ends_the_event() -> None:
    scanner = wire.SSEScanner()
    assert scanner.feed(b"data: 1\r\n") == []
    assert scanner.feed(b"\r") == []
    assert scanner.feed(b"\ndata: 2\n") == [b"data: 1\r\n\r\n"]
    assert scanner.feed(b"\ndata: 3") == [b"data: 2\n\n"]
    assert scanner.flush() == b"data: 3"
    assert scanner.feed(b"data: 4\n\n") == [b"data: 4\n\n"]
