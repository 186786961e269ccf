"""Raw-socket HTTP for tests: a scripted upstream and a client that shows the bytes as they came.

For what an HTTP library would normalize, refuse or hide: a path sent with its dot segments, a body
cut mid-way by a FIN or a reset, a stall, an upstream that never answers ``100 Continue``, a response
that lacks its chunked terminator.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Seen:
    """One request the raw upstream received (``body`` None when it did not arrive in time)."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes | None


Script = Callable[[socket.socket, Seen, threading.Event], None]


def _read_head(conn: socket.socket) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        more = conn.recv(65536)
        if not more:
            raise ConnectionError("closed before the head")
        data += more
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _read_body(conn: socket.socket, headers: dict[str, str], rest: bytes) -> bytes | None:
    """The body by Content-Length or chunked; None if it does not come within the socket's timeout
    (a client waiting for ``100 Continue`` sends none)."""
    try:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while not rest.endswith(b"0\r\n\r\n"):
                more = conn.recv(65536)
                if not more:
                    return None
                rest += more
            return decode_chunked(rest)[0]
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            more = conn.recv(65536)
            if not more:
                return None
            rest += more
        return rest
    except TimeoutError:
        return None


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """The first line and the headers (lower-case names) of a request or response head."""
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers


class RawUpstream:
    """A loopback server that hands each request to ``script(conn, seen, stop)`` and records it.

    ``/tokenize`` is answered 404 (so the proxy counts with cl100k) and not recorded; ``stop`` is set on
    :meth:`close`, for scripts that stall.
    """

    def __init__(self, script: Script, *, body_wait_s: float = 1.0) -> None:
        self.script = script
        self.seen: list[Seen] = []
        self.stop = threading.Event()
        self._body_wait_s = body_wait_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(self._body_wait_s)
            try:
                while not self.stop.is_set():
                    head, rest = _read_head(conn)
                    line, headers = parse_head(head)
                    method, target, _version = line.split(" ", 2)
                    seen = Seen(method, target, headers, _read_body(conn, headers, rest))
                    if target == "/tokenize":
                        conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                        continue
                    self.seen.append(seen)
                    conn.settimeout(30)
                    self.script(conn, seen, self.stop)
                    return
            except (OSError, ValueError):
                return

    def close(self) -> None:
        self.stop.set()
        self._listener.close()
        self._accepting.join(5)
        for thread in self._threads:
            thread.join(5)


def reset(conn: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER with a zero timeout)."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def decode_chunked(data: bytes) -> tuple[bytes, bool]:
    """A chunked body's content, and whether it ended with its last chunk (``0\\r\\n\\r\\n``)."""
    out = b""
    while True:
        size_line, sep, rest = data.partition(b"\r\n")
        if not sep:
            return out, False
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            return out, False
        if size == 0:
            return out, rest.startswith(b"\r\n")
        if len(rest) < size + 2:
            return out + rest[:size], False
        out += rest[:size]
        data = rest[size + 2 :]


@dataclass
class RawResponse:
    """What a raw client read until the server closed the connection (or its timeout passed)."""

    status: int
    headers: dict[str, str]
    body: bytes
    complete: bool  # the body reached its declared end: the last chunk, or Content-Length
    closed: bool  # the server closed the connection (rather than the client giving up)
    raw: bytes = field(repr=False)


def exchange(url: str, request: bytes, *, timeout_s: float = 20.0) -> RawResponse:
    """Send ``request`` as it is (no normalization) and read the answer until the server closes."""
    host, port = url.removeprefix("http://").split(":")
    raw = b""
    closed = False
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        sock.sendall(request)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                data = sock.recv(65536)
                if not data:
                    closed = True
                    break
                raw += data
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            pass
    return parse_response(raw, closed)


def parse_response(raw: bytes, closed: bool) -> RawResponse:
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        return RawResponse(0, {}, b"", False, closed, raw)
    line, headers = parse_head(head)
    status = int(line.split(" ")[1])
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, complete = decode_chunked(rest)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        body, complete = rest[:length], len(rest) >= length
    else:
        body, complete = rest, closed
    return RawResponse(status, headers, body, complete, closed, raw)


def request_bytes(
    method: str, target: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> bytes:
    """A request head (and body) exactly as given, with ``Connection: close``."""
    lines = [f"{method} {target} HTTP/1.1", "Host: proxy", "Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")
