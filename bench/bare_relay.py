"""The least an aiohttp reverse proxy can do: the reference that ``bench/overhead.py`` sets beside the proxy.

Run as its own process: ``python bench/bare_relay.py PORT UPSTREAM_URL``. The same stack as the proxy
(an aiohttp server and one aiohttp client session with a keep-alive pool to the upstream, on uvloop, no
access log) and the same HTTP handling (the proxy's own ``forward_headers`` both ways, bodies not decompressed,
streams relayed read by read), with nothing else: no body parsing, no token counting, no metering, no
ledger, no added headers; served by the proxy's own ``serve_app`` with the collector tuning of
``scer-proxy serve``. Whatever it costs over direct calls is the price of the stack itself, which no
proxy built on it can go below; the proxy's figures are read against it.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

from scer_proxy.proxy.handler import forward_headers
from scer_proxy.proxy.serving import serve_until_signal, tune_gc_for_serving


def make_app(upstream_url: str) -> web.Application:
    app = web.Application()

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=2000, limit_per_host=2000, keepalive_timeout=60)
        async with aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_read=600),
        ) as session:
            app["session"] = session
            yield

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        session: aiohttp.ClientSession = request.app["session"]
        async with session.request(
            request.method,
            upstream_url + request.path_qs,
            data=body,
            headers=forward_headers(request.headers),
            allow_redirects=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        ) as resp:
            headers = forward_headers(resp.headers)
            if not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                return web.Response(
                    status=resp.status, reason=resp.reason, body=await resp.read(), headers=headers
                )
            out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=headers)
            await out.prepare(request)
            async for data in resp.content.iter_any():
                await out.write(data)
            await out.write_eof()
            return out

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


async def serve(host: str, port: int, upstream_url: str) -> None:
    # The proxy's own serving: the same server settings, then the same process tuning as `scer-proxy serve`.
    await serve_until_signal(
        make_app(upstream_url), host, port, shutdown_timeout=1.0, on_started=tune_gc_for_serving
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("port", type=int)
    parser.add_argument("upstream_url")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.host, args.port, args.upstream_url.rstrip("/")))


if __name__ == "__main__":
    main()
