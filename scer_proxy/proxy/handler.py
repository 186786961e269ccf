"""The ``/v1/*`` handler: forwards every request untouched and meters the ones that generate tokens.

Non-streamed metered responses are read whole, up to ``server.max_response_bytes`` (their headers must
carry the figures); streams are relayed read by read as they arrive, with backpressure, and scanned for
events on the way. A client that goes away cancels the upstream request at once, and its record keeps
the tokens it was sent. An answer the upstream breaks off is broken off for the client too: the
connection closes without the body's end, so no client takes a cut answer for a complete one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
import orjson
import structlog
import yarl
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from scer_proxy.carbon.records import Record
from scer_proxy.config import Config, UpstreamConfig
from scer_proxy.proxy.accounting import Accounting, PromptCount, count_text_off_loop
from scer_proxy.proxy.bodies import ResponseTooLarge, decode_capped, needs_decoding
from scer_proxy.proxy.upstreams import Upstreams
from scer_proxy.wire import openai as wire
from scer_proxy.wire import tokens

log = structlog.get_logger("scer_proxy.request")

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
        # The proxy holds the body before it forwards it: an upstream that never answers 100 would make
        # the client side wait for it, past timeout_s.
        "Expect",
    )
)
# Characters a model name may not hold: it is echoed in a response header (X-SCER-Model), where CR, LF
# or NUL would break the response.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# What stays unescaped when a normalized path is forwarded (RFC 3986 pchar and "/").
_PATH_SAFE = "/:@!$&'()*+,;=-._~"
# How reading an upstream's body fails: a FIN or a reset mid-body, a read timeout.
_UPSTREAM_READ_ERRORS = (aiohttp.ClientError, OSError)  # OSError includes TimeoutError


def normalize_path(raw_path: str) -> str:
    """A request path as the upstream will resolve it: percent escapes decoded (``%2e``, ``%2f``),
    backslashes as slashes, then dot segments removed (RFC 3986, 5.2.4).

    The router matches ``/v1/{tail}`` on the path as sent; an HTTP client resolves ``..`` before it
    sends, so ``/v1/../metrics`` would reach the upstream's ``/metrics``. Checking and forwarding this
    form keeps every forwarded request under ``/v1``.
    """
    segments = unquote(raw_path).replace("\\", "/").split("/")
    out: list[str] = []
    for segment in segments[1:]:
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
    if segments[-1] in (".", ".."):
        out.append("")  # "/v1/a/.." is the directory "/v1/"
    return "/" + "/".join(out)


def upstream_target(request: web.Request) -> tuple[str, str] | None:
    """The normalized path and the target (escaped path and raw query) to forward, or None when the
    path leaves ``/v1``."""
    path = normalize_path(request.rel_url.raw_path)
    if path != "/v1" and not path.startswith("/v1/"):
        return None
    query = request.rel_url.raw_query_string
    return path, quote(path, safe=_PATH_SAFE) + ("?" + query if query else "")


def abort_client(request: web.Request) -> None:
    """Break off a response that cannot be finished, as nginx and Envoy do: what was written is flushed,
    then the connection closes without the body's end (a chunked body's last chunk, the rest of a
    Content-Length), so that the client sees a truncated answer, not a complete one. The handler then
    returns its response; aiohttp's ``write_eof`` finds the transport closing and writes nothing."""
    transport = request.transport
    if transport is not None:
        transport.close()


def forward_headers(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """Headers minus hop-by-hop ones (and those named in ``Connection``), Content-Length and Expect."""
    out = CIMultiDict(
        headers
    )  # a copy in C; removing the few present names is cheaper than filtering in Python
    named = {t.strip() for v in headers.getall("Connection", ()) for t in v.split(",")}
    for name in (*HOP_BY_HOP, *named):
        if name and name in out:
            del out[name]
    return out


def error_response(
    status: int, message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> web.Response:
    return web.Response(
        status=status,
        body=wire.error_body(message, type_, param=param, code=code),
        content_type="application/json",
    )


class ProxyError(Exception):
    """An error the proxy itself answers, in the OpenAI error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str,
        *,
        reached_upstream: bool = True,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type_, self.code = status, message, type_, code
        self.param = param
        # False when the request never got to the upstream (no connection): it cannot have used its GPU.
        self.reached_upstream = reached_upstream
        self.record: Record | None = None  # the record written for it, once there is one

    def response(self) -> web.Response:
        out = error_response(self.status, self.message, self.type_, param=self.param, code=self.code)
        if self.record is not None:
            out.headers["X-SCER-Request-Id"] = self.record.request_id
            out.headers["X-SCER-Model"] = self.record.model
        return out


def _too_large(upstream: UpstreamConfig, limit: int) -> ProxyError:
    return ProxyError(
        502,
        f"Upstream '{upstream.name}' answered with a body over the limit of {limit} bytes.",
        "upstream_error",
        "upstream_response_too_large",
    )


@dataclass
class Exchange:
    """What the handler learned of one metered exchange, for the canonical log line."""

    kind: str
    model: str
    upstream: str
    stream: bool
    prompt: PromptCount
    started_s: float = field(default_factory=time.monotonic)
    first_byte_s: float | None = None
    chunks: int = 0
    closed: bool = False


class ProxyHandler:
    def __init__(self, config: Config, upstreams: Upstreams, accounting: Accounting) -> None:
        self.config = config
        self.upstreams = upstreams
        self.accounting = accounting
        self._routes: dict[str, UpstreamConfig | None] = {}  # model -> upstream, so globs match once a model

    def _upstream_for(self, model: str) -> UpstreamConfig | None:
        routes = self._routes
        if model not in routes:
            if len(routes) >= 4096:  # any client can name any model: keep the map bounded
                routes.clear()
            routes[model] = self.config.upstream_for(model)
        return routes[model]

    # -- entry ----------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            target = upstream_target(request)
            if target is None:
                raise ProxyError(
                    404,
                    "Not Found: the path resolves outside /v1/.",
                    "invalid_request_error",
                    "path_not_found",
                    reached_upstream=False,
                )
            path, sent = target
            kind = wire.metered_kind(request.method, path)
            if kind is None:
                return await self._passthrough(request, sent)
            body = await self._read_body(request)
            parsed = wire.parse_json_object(body)
            model = parsed.get("model") if parsed is not None else None
            if not isinstance(model, str) or not model:
                # Not something we can route or meter: forward it untouched and return the answer.
                return await self._passthrough(request, sent, body=body, upstream=self.config.upstreams[0])
            if _CONTROL.search(model):
                raise ProxyError(
                    400,
                    "The model name holds a control character.",
                    "invalid_request_error",
                    "invalid_model",
                    param="model",
                )
            upstream = self._upstream_for(model)
            if upstream is None:
                raise ProxyError(
                    404,
                    f"No upstream serves the model '{model}'.",
                    "invalid_request_error",
                    "model_not_found",
                )
            assert parsed is not None
            return await self._metered(request, sent, kind, body, parsed, model, upstream)
        except ProxyError as exc:
            log.info("proxy_error", path=request.path, status=exc.status, code=exc.code)
            return exc.response()

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.config.server.max_body_bytes
        if request.content_length is not None:
            if request.content_length > limit:
                raise ProxyError(
                    413,
                    f"Request body of {request.content_length} bytes is over the limit of {limit}.",
                    "invalid_request_error",
                    "request_too_large",
                )
            return await request.read()  # the parser stops at Content-Length, so the limit holds
        chunks = []
        size = 0
        async for chunk in request.content.iter_chunked(65536):
            size += len(chunk)
            if size > limit:
                raise ProxyError(
                    413,
                    f"Request body is over the limit of {limit} bytes.",
                    "invalid_request_error",
                    "request_too_large",
                )
            chunks.append(chunk)
        return b"".join(chunks)

    # -- upstream calls ---------------------------------------------------------------------------
    async def _send(
        self,
        request: web.Request,
        target: str,
        upstream: UpstreamConfig,
        data: Any,
        headers: CIMultiDict[str] | None = None,
    ) -> aiohttp.ClientResponse:
        session = self.upstreams.session(upstream.name)
        # Already normalized and escaped: taken as it is, so that nothing resolves it a second time.
        url = yarl.URL(upstream.url + target, encoded=True)
        try:
            return await session.request(
                request.method,
                url,
                data=data,
                headers=headers if headers is not None else forward_headers(request.headers),
                allow_redirects=False,
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                timeout=self.upstreams.timeout(upstream.name),
            )
        except TimeoutError as exc:
            raise ProxyError(
                504,
                f"Upstream '{upstream.name}' did not answer in time.",
                "upstream_error",
                "upstream_timeout",
                # A connect timeout: the request was never sent. A read timeout: it was, and may be running.
                reached_upstream=not isinstance(exc, aiohttp.ConnectionTimeoutError),
            ) from exc
        except aiohttp.ClientConnectorError as exc:
            raise ProxyError(
                502,
                f"Upstream '{upstream.name}' refused the connection: {exc.os_error}.",
                "upstream_error",
                "upstream_unavailable",
                reached_upstream=False,
            ) from exc
        except aiohttp.ClientError as exc:
            raise ProxyError(
                502,
                f"Upstream '{upstream.name}' failed: {exc.__class__.__name__}.",
                "upstream_error",
                "upstream_unavailable",
            ) from exc

    async def _read_upstream(self, resp: aiohttp.ClientResponse, upstream: UpstreamConfig) -> bytes:
        """The whole body, up to ``server.max_response_bytes`` (counted as it arrives; a body over it is
        not read on, and its connection is dropped)."""
        limit = self.config.server.max_response_bytes
        if resp.content_length is not None and resp.content_length > limit:
            resp.close()
            raise _too_large(upstream, limit)
        chunks = []
        size = 0
        try:
            async for chunk in resp.content.iter_any():
                size += len(chunk)
                if size > limit:
                    resp.close()
                    raise _too_large(upstream, limit)
                chunks.append(chunk)
            return b"".join(chunks)
        except TimeoutError as exc:
            raise ProxyError(
                504, f"Upstream '{upstream.name}' stopped answering.", "upstream_error", "upstream_timeout"
            ) from exc
        except _UPSTREAM_READ_ERRORS as exc:
            raise ProxyError(
                502,
                f"Upstream '{upstream.name}' broke off its response: {exc.__class__.__name__}.",
                "upstream_error",
                "upstream_unavailable",
            ) from exc

    # -- unmetered -----------------------------------------------------------------------------------
    async def _passthrough(
        self,
        request: web.Request,
        target: str,
        *,
        body: bytes | None = None,
        upstream: UpstreamConfig | None = None,
    ) -> web.StreamResponse:
        upstream = upstream or self.config.upstreams[0]
        data: Any = body if body is not None else (request.content if request.body_exists else None)
        resp = await self._send(request, target, upstream, data)
        try:
            headers = forward_headers(resp.headers)
            out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
            if resp.content_length is not None:
                out.content_length = resp.content_length
            await out.prepare(request)
            while True:
                try:
                    data_chunk = await resp.content.readany()
                except _UPSTREAM_READ_ERRORS as exc:
                    resp.close()
                    log.info("upstream_broke_passthrough", path=request.path, error=exc.__class__.__name__)
                    abort_client(request)
                    return out
                if not data_chunk:
                    break
                await out.write(data_chunk)
            await out.write_eof()
            return out
        except ConnectionResetError:  # the client went away
            resp.close()
            return out
        finally:
            resp.release()

    # -- metered ----------------------------------------------------------------------------------
    async def _metered(
        self,
        request: web.Request,
        target: str,
        kind: str,
        body: bytes,
        parsed: dict[str, Any],
        model: str,
        upstream: UpstreamConfig,
    ) -> web.StreamResponse:
        stream = wire.wants_stream(parsed)
        asked_usage = wire.client_asked_usage(parsed)
        injected = False
        send_body = body
        if stream and kind in ("chat", "completions") and not asked_usage:
            send_body = wire.with_usage_requested(parsed)
            injected = True
        headers = forward_headers(request.headers)
        # The prompt's size places its prefill on the timeline; it is counted off the event loop.
        prompt = PromptCount(kind, parsed)
        record = self.accounting.open(
            upstream=upstream.name,
            model=model,
            tenant=self.accounting.tenant(request.headers),
            endpoint=kind,
            stream=stream,
            prompt_estimate=prompt.first,
        )
        prompt.when_counted(lambda count: self.accounting.prompt_counted(record, count))
        ex = Exchange(kind=kind, model=model, upstream=upstream.name, stream=stream, prompt=prompt)
        # Whatever happens below, the record is closed exactly once: the timeline must not keep a request
        # that has ended, and no ledger record is lost.
        try:
            resp = await self._send(request, target, upstream, send_body, headers)
            try:
                ex.first_byte_s = time.monotonic()
                content_type = resp.headers.get("Content-Type", "")
                if resp.status == 200 and content_type.startswith("text/event-stream"):
                    return await _StreamRelay(
                        self, request, resp, record, ex, parsed, asked_usage, injected, upstream
                    ).run()
                return await self._buffered(request, resp, record, ex, parsed, upstream)
            finally:
                resp.release()
        except (asyncio.CancelledError, Exception) as exc:
            if ex.closed:
                raise
            status, http_status, flag = _failure(exc)
            try:
                await ex.prompt.wait()  # the prompt's count, if a thread is counting it
            finally:
                closed = self._close(
                    record,
                    ex,
                    parsed,
                    status=status,
                    http_status=http_status,
                    completion_tokens=0,
                    usage=None,
                    flags=(flag,),
                    reached_upstream=not isinstance(exc, ProxyError) or exc.reached_upstream,
                )
            if isinstance(exc, ProxyError):
                exc.record = closed  # its answer names the record
                raise
            if isinstance(exc, asyncio.CancelledError | ConnectionError):
                raise
            log.exception("handler_error", path=request.path, request_id=closed.request_id)
            failure = ProxyError(
                500, "The proxy failed to handle the request.", "server_error", "proxy_failure"
            )
            failure.record = closed
            raise failure from exc

    async def _buffered(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        record: Record,
        ex: Exchange,
        parsed: dict[str, Any],
        upstream: UpstreamConfig,
    ) -> web.StreamResponse:
        raw = await self._read_upstream(resp, upstream)
        headers = forward_headers(resp.headers)
        usage = None
        completion_tokens = 0
        decoded = await self._decoded(raw, resp.headers.get("Content-Encoding", ""), upstream)
        answer = wire.parse_json_object(decoded) if decoded is not None else None
        if answer is not None:
            usage = wire.read_usage(answer.get("usage"), self.config.server.max_usage_tokens)
            if wire.trusted(usage) is None and resp.status < 400:
                completion_tokens = await self._count_text(upstream, wire.response_text(ex.kind, answer))
        if wire.trusted(usage) is None:
            await ex.prompt.wait()
        ok = resp.status < 400
        record = self._close(
            record,
            ex,
            parsed,
            status="ok" if ok else "upstream_error",
            http_status=resp.status,
            completion_tokens=completion_tokens,
            usage=usage,
        )
        if ok:
            headers.update(record.headers())
        else:
            headers["X-SCER-Request-Id"] = record.request_id
            headers["X-SCER-Model"] = record.model
        return web.Response(status=resp.status, reason=resp.reason, body=raw, headers=headers)

    async def _decoded(self, raw: bytes, encoding: str, upstream: UpstreamConfig) -> bytes | None:
        """A decompressed copy of a body, for reading usage (the client gets ``raw``): in a worker thread
        (zlib releases the GIL), up to ``server.max_response_bytes``; None when it cannot be read."""
        if not needs_decoding(encoding):
            return raw
        limit = self.config.server.max_response_bytes
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, decode_capped, raw, encoding, limit)
        except ResponseTooLarge:
            raise _too_large(upstream, limit) from None

    async def _count_text(self, upstream: UpstreamConfig, text: str) -> int:
        if not text:
            return 0
        counted = await self.upstreams.tokenize(upstream.name, text)
        return counted if counted is not None else await count_text_off_loop(text)

    def _close(
        self,
        record: Record,
        ex: Exchange,
        parsed: dict[str, Any],
        *,
        status: str,
        http_status: int | None,
        completion_tokens: int,
        usage: wire.Usage | None,
        flags: tuple[str, ...] = (),
        reached_upstream: bool = True,
    ) -> Record:
        counted, source, counted_flags = ex.prompt.result()
        if usage is not None and usage.valid:
            prompt, completion, source = usage.prompt_tokens, usage.completion_tokens, "upstream"
        else:
            prompt, completion = counted, completion_tokens
            flags = (*flags, *counted_flags, *(("upstream_usage_invalid",) if usage is not None else ()))
        ex.closed = True
        done = self.accounting.close(
            record,
            prompt_tokens=prompt,
            completion_tokens=completion,
            token_source=source,
            status=status,
            http_status=http_status,
            flags=flags,
            reached_upstream=reached_upstream,
        )
        if not log.is_enabled_for(logging.INFO):  # its fields cost more than the call: skip both
            return done
        now = time.monotonic()
        log.info(
            "request",
            request_id=done.request_id,
            endpoint=ex.kind,
            model=ex.model,
            upstream=ex.upstream,
            tenant=done.tenant,
            stream=ex.stream,
            status=status,
            http_status=http_status,
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            token_source=source,
            energy_j=done.energy_j,
            energy_source=done.energy_source,
            carbon_g=done.carbon_g,
            duration_ms=round((now - ex.started_s) * 1000.0, 3),
            ttfb_ms=None if ex.first_byte_s is None else round((ex.first_byte_s - ex.started_s) * 1000.0, 3),
            chunks=ex.chunks,
            flags=list(done.flags) or None,
        )
        return done


# Keys every chunk has; anything else on a usage-only chunk was moved there by the server.
_CHUNK_KEYS = frozenset(
    (
        "id",
        "object",
        "created",
        "model",
        "system_fingerprint",
        "choices",
        "usage",
        "service_tier",
        "obfuscation",
    )
)


def _failure(exc: BaseException) -> tuple[str, int | None, str]:
    """How a request that ended in ``exc`` is recorded: its status, HTTP status and flag."""
    if isinstance(exc, asyncio.CancelledError):
        # The client went away while the upstream was still working: the upstream connection closes
        # with the cancelled task, which stops the generation.
        return "cancelled", None, "client_disconnected"
    if isinstance(exc, ProxyError):
        return "error", exc.status, exc.code
    return "error", 500, "proxy_failure"


class _UpstreamCut(Exception):
    """The upstream broke off a stream; ``reason`` names how (the exception's class)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _finishes(chunk: dict[str, Any]) -> bool:
    choices = chunk.get("choices")
    return isinstance(choices, list) and any(isinstance(c, dict) and c.get("finish_reason") for c in choices)


def _is_done(event: bytes) -> bool:
    if b"[DONE]" not in event:
        return False
    payload = wire.event_payload(event)
    return payload is not None and payload.strip() == b"[DONE]"


class _StreamRelay:
    """Relays one SSE stream read by read, rewriting only the usage chunk and the end of the stream.

    The final usage is the one on the last data event before ``[DONE]`` (or the end): some servers put a
    running or placeholder usage on every chunk (vLLM's continuous usage stats, Ollama's zeros), so a
    chunk that carries usage is held in a one-event slot until the next event shows whether it was the
    last. When the proxy asked for usage on the client's behalf, the finish chunk is held too: servers
    move keys of it (llama.cpp's ``timings``) onto the usage chunk, and they are moved back before the
    usage chunk is dropped.
    """

    def __init__(
        self,
        handler: ProxyHandler,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        record: Record,
        ex: Exchange,
        parsed: dict[str, Any],
        asked_usage: bool,
        injected: bool,
        upstream: UpstreamConfig,
    ) -> None:
        self.h = handler
        self.upstream = upstream
        self.counted_completion: int | None = None
        self.request = request
        self.resp = resp
        self.record = record
        self.ex = ex
        self.parsed = parsed
        self.asked_usage = asked_usage
        self.injected = injected
        self.scanner = wire.SSEScanner()
        self.text_parts: list[str] = []
        self.closed: Record | None = None
        self.figures_sent = False
        self.last_usage: wire.Usage | None = None
        self.held: tuple[bytes, dict[str, Any]] | None = None
        self.on_tokens = handler.accounting.token_sink(record)
        encoding = resp.headers.get("Content-Encoding", "").strip().lower()
        self.rewrite = encoding in ("", "identity")

    async def run(self) -> web.StreamResponse:
        headers = forward_headers(self.resp.headers)
        headers["X-SCER-Request-Id"] = self.record.request_id
        headers["X-SCER-Model"] = self.record.model
        out = web.StreamResponse(status=self.resp.status, reason=self.resp.reason, headers=headers)
        status = "ok"
        flags: tuple[str, ...] = ()
        try:
            await out.prepare(self.request)
            while data := await self._read():
                if not self.rewrite:
                    await out.write(data)
                    continue
                parts = []
                for event in self.scanner.feed(data):
                    if self.closed is None and wire.trusted(self.last_usage) is None and _is_done(event):
                        # The stream ends without usage: count with the upstream's /tokenize where it has one.
                        text = "".join(self.text_parts)
                        self.counted_completion = await self.h._count_text(self.upstream, text)
                        await self.ex.prompt.wait()
                    parts.append(self._event(event))
                chunk = b"".join(parts)
                if chunk:
                    await out.write(chunk)
            if self.rewrite:
                tail = self.scanner.flush()
                ending = self._event(tail) if tail else b""
                if self.closed is None and wire.trusted(self.last_usage) is None:
                    # The stream ended without (valid) usage and without [DONE]: count as at [DONE].
                    text = "".join(self.text_parts)
                    self.counted_completion = await self.h._count_text(self.upstream, text)
                    await self.ex.prompt.wait()
                ending += self._release(final=True)
                if not self.figures_sent:
                    ending += wire.scer_comment(self._finish("ok", (), self.last_usage).scer())
                if ending:
                    await out.write(ending)
            await out.write_eof()
        except asyncio.CancelledError:
            # The client went away: drop the upstream connection now so the server stops generating.
            self.resp.close()
            await self._finish_cut("cancelled", ("client_disconnected",))
            raise
        except ConnectionResetError:  # writing to a client that went away
            self.resp.close()
            await self._finish_cut("cancelled", ("client_disconnected",))
            return out
        except _UpstreamCut as cut:
            # FIN or RST mid-body, or nothing for timeout_s: the client must not see a complete answer.
            self.resp.close()
            await self._finish_cut("upstream_error", ("upstream_broke_stream", cut.reason))
            abort_client(self.request)
            return out
        except Exception:
            log.exception("relay_error", request_id=self.record.request_id)
            self.resp.close()
            self._finish("error", ("proxy_failure",))
            abort_client(self.request)
            return out
        self._finish(status, flags, self.last_usage)
        return out

    async def _read(self) -> bytes:
        """The upstream's next read (empty at its end). Its failures are raised as :class:`_UpstreamCut`,
        so that they are not taken for the client's (a reset on either side is a ConnectionResetError)."""
        try:
            return await self.resp.content.readany()
        except _UPSTREAM_READ_ERRORS as exc:
            raise _UpstreamCut(exc.__class__.__name__) from exc

    async def _finish_cut(self, status: str, flags: tuple[str, ...]) -> None:
        """Close the record of a stream cut short, its tokens so far counted as at a usage-less end.

        The completion text and the prompt are counted with the upstream's ``/tokenize`` where it has
        one (cl100k otherwise; for chat, only a server with vLLM's chat form counts the prompt). The
        counts await I/O (5 s at most, both at once) on a task that may be cancelled, now or again
        while it waits: the ``finally`` closes the record whatever happens, with cl100k's count if the
        upstream's did not arrive, so it is written exactly once (``_finish`` closes only the first
        time) and never lost.
        """
        try:
            if self.closed is None:
                await asyncio.gather(
                    self._count_cut_completion(),
                    self.ex.prompt.ask_upstream(self.h.upstreams, self.upstream.name),
                )
        finally:
            self._finish(status, flags)

    async def _count_cut_completion(self) -> None:
        if self.counted_completion is None:
            text = "".join(self.text_parts)
            self.counted_completion = await self.h._count_text(self.upstream, text)

    def _finish(self, status: str, flags: tuple[str, ...], usage: wire.Usage | None = None) -> Record:
        if self.closed is None:
            completion = 0
            if wire.trusted(usage) is None:
                counted = self.counted_completion
                completion = counted if counted is not None else tokens.count_text("".join(self.text_parts))
            self.closed = self.h._close(
                self.record,
                self.ex,
                self.parsed,
                status=status,
                http_status=self.resp.status,
                completion_tokens=completion,
                usage=usage,
                flags=flags,
            )
            self.text_parts.clear()
        return self.closed

    def _event(self, event: bytes) -> bytes:
        self.ex.chunks += 1
        payload = wire.event_payload(event)
        if payload is None:
            return event
        if payload.strip() == b"[DONE]":
            out = self._release(final=True)
            if not self.figures_sent:
                self.figures_sent = True
                out += wire.scer_comment(self._finish("ok", (), self.last_usage).scer(), like=event)
            return out + event
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return self._release(final=False) + event
        if not isinstance(chunk, dict):
            return self._release(final=False) + event
        text = wire.chunk_text(chunk)
        if text:
            self.on_tokens(1)
            self.text_parts.append(text)
        if self.ex.kind == "responses":
            return self._responses_event(event, chunk)
        usage = wire.read_usage(chunk.get("usage"), self.h.config.server.max_usage_tokens)
        if usage is not None:
            self.last_usage = usage
        out = b""
        if self.held is not None:
            held_event, held_chunk = self.held
            if self.injected and usage is not None and not chunk.get("choices") and _finishes(held_chunk):
                # The usage chunk the client did not ask for: move back what the server moved off the
                # finish chunk, and drop the rest.
                moved = {k: v for k, v in chunk.items() if k not in _CHUNK_KEYS and k not in held_chunk}
                if moved:
                    merged = {**held_chunk, **moved}
                    self.held = (wire.data_event(merged, held_event), merged)
                return b""
            out = self._release(final=False)
        if usage is not None or (self.injected and _finishes(chunk)):
            self.held = (event, chunk)
            return out
        if self.injected and b'"usage"' in event:
            return out + wire.strip_null_usage(event)
        return out + event

    def _release(self, *, final: bool) -> bytes:
        """Send the held event: as the last one (with the figures) or as an ordinary one."""
        if self.held is None:
            return b""
        event, chunk = self.held
        self.held = None
        has_usage = isinstance(chunk.get("usage"), dict)
        if self.asked_usage:
            if final and has_usage:
                record = self._finish("ok", (), self.last_usage)
                self.figures_sent = True
                chunk["usage"] = {**chunk["usage"], "scer": record.scer()}
                return wire.data_event(chunk, event)
            return event
        # The client did not ask for usage: it must not see any.
        if "usage" in chunk:
            if not chunk.get("choices"):
                return b""
            del chunk["usage"]
            return wire.data_event(chunk, event)
        return event

    def _responses_event(self, event: bytes, chunk: dict[str, Any]) -> bytes:
        if chunk.get("type") != "response.completed":
            return event
        response = chunk.get("response")
        max_tokens = self.h.config.server.max_usage_tokens
        usage = wire.read_usage(response.get("usage"), max_tokens) if isinstance(response, dict) else None
        if usage is None or not isinstance(response, dict):
            return event
        record = self._finish("ok", (), usage)
        self.figures_sent = True
        response["usage"] = {**response["usage"], "scer": record.scer()}
        return wire.responses_completed_event(event, chunk)
