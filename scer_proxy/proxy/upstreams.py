"""The upstream servers: one aiohttp client session (a shared keep-alive connection pool) each.

Bodies are never decompressed on the way through (``auto_decompress=False``): the client receives the
upstream's bytes; the proxy decompresses a copy only to read usage. Cookies are not kept.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from scer_proxy.config import UpstreamConfig
from scer_proxy.wire import tokens


class Upstreams:
    def __init__(self, upstreams: tuple[UpstreamConfig, ...]) -> None:
        self._configs = {u.name: u for u in upstreams}
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._timeouts: dict[str, aiohttp.ClientTimeout] = {}
        self._tokenize: dict[str, bool] = {}

    async def open(self) -> None:
        for name, cfg in self._configs.items():
            connector = aiohttp.TCPConnector(
                limit=cfg.max_connections,
                limit_per_host=cfg.max_connections,
                keepalive_timeout=60,
                enable_cleanup_closed=False,
            )
            self._sessions[name] = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=None),
                raise_for_status=False,
            )
            # No data from the upstream for timeout_s is a timeout; a long stream with steady tokens is not.
            self._timeouts[name] = aiohttp.ClientTimeout(
                total=None, sock_connect=cfg.connect_timeout_s, sock_read=cfg.timeout_s
            )

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()

    def session(self, name: str) -> aiohttp.ClientSession:
        return self._sessions[name]

    def timeout(self, name: str) -> aiohttp.ClientTimeout:
        return self._timeouts[name]

    def config(self, name: str) -> UpstreamConfig:
        return self._configs[name]

    async def tokenize(self, name: str, text: str) -> int | None:
        """Count ``text`` with the upstream's own ``/tokenize`` (vLLM, SGLang, llama.cpp), or None.

        The body carries both spellings of the text field (vLLM's ``prompt``, llama.cpp's ``content``).
        """
        answer = await self._post_tokenize(
            name, {"prompt": text, "content": text, "add_special_tokens": False}
        )
        return tokens.tokenize_count(answer)

    async def tokenize_prompt(self, name: str, kind: str, body: dict[str, Any]) -> int | None:
        """A request's prompt counted by the upstream's ``/tokenize``, or None where it cannot count it.

        Chat prompts in the chat form (template applied, vLLM and SGLang), believed only with a ``count``
        (llama.cpp has no chat form); text completions prompts as text (:func:`tokens.tokenize_prompt_request`).
        """
        request = tokens.tokenize_prompt_request(kind, body)
        if request is None:
            return None
        # Not remembered as absent on a 404: the request names a model, which a server can 404 on its own.
        answer = await self._post_tokenize(name, request, remember_absent=False)
        counted = tokens.tokenize_count(answer, need_count=kind == "chat")
        return counted if counted else None  # a prompt is never 0 tokens: 0 means it was not understood

    async def _post_tokenize(
        self, name: str, request: dict[str, Any], *, remember_absent: bool = True
    ) -> Any:
        """POST ``request`` to the upstream's ``/tokenize`` (5 s at most): its JSON answer, or None.

        A server without the endpoint (404, 405, 501) is remembered and not asked again.
        """
        if self._tokenize.get(name) is False:
            return None
        cfg = self._configs[name]
        try:
            async with self._sessions[name].post(
                cfg.url + "/tokenize",
                data=orjson.dumps(request),
                headers={"Content-Type": "application/json"},
                timeout=aiohttp.ClientTimeout(total=5),
            ) as resp:
                if resp.status in (404, 405, 501):
                    if remember_absent:
                        self._tokenize[name] = False
                    return None
                if resp.status != 200:
                    return None
                answer = orjson.loads(await resp.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError, orjson.JSONEncodeError):
            return None
        self._tokenize[name] = True
        return answer
