"""``/scer/``: the dashboard, one self-contained page (``dashboard.html``: HTML, CSS and vanilla JS, nothing
fetched from elsewhere) that reads ``/scer/summary``, ``/scer/requests`` and ``/scer/health`` every 5 s.

The page itself carries no data, so it is the one ``/scer`` path served without the admin token; it asks for
the token and sends it on its own fetches.
"""

from __future__ import annotations

import secrets
from functools import cache
from importlib import resources

from aiohttp import web

PATH = "/scer/"
_NONCE = "__CSP_NONCE__"  # the placeholder in dashboard.html, replaced per response


@cache
def _template() -> str:
    return (resources.files("scer_proxy.web") / "dashboard.html").read_text(encoding="utf-8")


def content_security_policy(nonce: str) -> str:
    """Same origin only: the inline script and style run by their nonce, fetches go to this proxy."""
    return (
        f"default-src 'self'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; img-src 'self' blob:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def is_public(request: web.Request) -> bool:
    """The page is the one ``/scer`` resource the admin gate lets through without the token."""
    return request.method in ("GET", "HEAD") and request.path == PATH


async def page(request: web.Request) -> web.Response:
    nonce = secrets.token_urlsafe(18)
    return web.Response(
        text=_template().replace(_NONCE, nonce),
        content_type="text/html",
        charset="utf-8",
        headers={
            "Content-Security-Policy": content_security_policy(nonce),
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


async def to_page(request: web.Request) -> web.Response:
    """``/scer`` -> ``/scer/``, keeping the query (``?since=1h`` selects the window)."""
    query = request.query_string
    raise web.HTTPMovedPermanently(PATH + ("?" + query if query else ""))


def add_routes(app: web.Application) -> None:
    app.router.add_get(PATH, page)
    app.router.add_get(PATH.rstrip("/"), to_page)
