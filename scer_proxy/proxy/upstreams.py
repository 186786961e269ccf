"""The upstream servers: one aiohttp client session (a shared keep-alive connection pool) each.

Bodies are never decompressed on the way through (``auto_decompress=False``): the client receives the
upstream's bytes; the proxy decompresses a copy only to read usage. Cookies are not kept.
"""

from __future__ import annotations

import aiohttp

from scer_proxy.config import UpstreamConfig


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

        The body carries both spellings of the text field (vLLM's ``prompt``, llama.cpp's ``content``);
        a server without the endpoint is remembered and not asked again.
        """
        if self._tokenize.get(name) is False:
            return None
        cfg = self._configs[name]
        try:
            async with self._sessions[name].post(
                cfg.url + "/tokenize",
                json={"prompt": text, "content": text, "add_special_tokens": False},
                timeout=aiohttp.ClientTimeout(total=5),
            ) as resp:
                if resp.status in (404, 405, 501):
                    self._tokenize[name] = False
                    return None
                if resp.status != 200:
                    return None
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        self._tokenize[name] = True
        if isinstance(body, dict):
            if isinstance(body.get("count"), int):
                return int(body["count"])
            if isinstance(body.get("tokens"), list):
                return len(body["tokens"])
        return None
