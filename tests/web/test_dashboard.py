"""``GET /scer/``: one self-contained page, strict headers, and every endpoint and field it reads exists;
a real proxy in front of the real simulator."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from urllib.parse import quote

import httpx
import pytest

from scer_proxy.sim import create_sim_app
from tests.servers import ThreadedServers

TOKEN = "s3cret"


class _Page(HTMLParser):
    """The page's tags with their attributes, its script text and its <select id="window"> options."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self.windows: list[str] = []
        self._in_script = False
        self._in_window = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"
        if tag == "select":
            self._in_window = dict(attrs).get("id") == "window"
        if tag == "option" and self._in_window:
            self.windows.append(dict(attrs).get("value") or "")

    def handle_endtag(self, tag: str) -> None:
        self._in_script = self._in_script and tag != "script"
        self._in_window = self._in_window and tag != "select"

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts.append(data)

    @property
    def script(self) -> str:
        return "".join(self.scripts)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def _sim_proxy(
    servers: ThreadedServers, start_proxy: Callable[..., str], **sections: dict
) -> tuple[str, str]:
    sim = servers.start(lambda: create_sim_app(time_scale=50.0))
    return sim, start_proxy(sim, meter={"kind": "simulated"}, **sections)


def _one_settled_request(http: httpx.Client, sim: str, proxy: str, headers: dict[str, str]) -> str:
    """One chat completion through the proxy, waited on until its record settles; returns the model."""
    model = http.get(f"{sim}/v1/models").json()["data"][0]["id"]
    resp = http.post(
        f"{proxy}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "rivers?"}], "max_tokens": 16},
    )
    assert resp.status_code == 200
    url = f"{proxy}/scer/requests/{resp.headers['x-scer-request-id']}"
    deadline = time.monotonic() + 10
    while not http.get(url, headers=headers).json()["settled"]:
        assert time.monotonic() < deadline, "the record never settled"
        time.sleep(0.02)
    return model


def test_page_is_self_contained_with_strict_headers(
    servers: ThreadedServers, start_proxy: Callable[..., str], http: httpx.Client
) -> None:
    _sim, proxy = _sim_proxy(servers, start_proxy)
    resp = http.get(f"{proxy}/scer/")
    assert resp.status_code == 200
    assert resp.headers["content-type"].split(";")[0] == "text/html"
    assert resp.headers["cache-control"] == "no-store"
    assert resp.headers["x-content-type-options"] == "nosniff"
    csp = {
        d.split()[0]: d.split()[1:] for d in resp.headers["content-security-policy"].split(";") if d.strip()
    }
    assert csp["default-src"] == ["'self'"] and csp["connect-src"] == ["'self'"]
    assert csp["object-src"] == ["'none'"] and csp["frame-ancestors"] == ["'none'"]
    page = _Page(resp.text)
    scripts = [attrs for tag, attrs in page.tags if tag == "script"]
    assert len(scripts) == 1 and "src" not in scripts[0]  # one inline script, nothing loaded
    nonce = scripts[0]["nonce"]
    assert nonce and csp["script-src"] == [f"'nonce-{nonce}'"]  # no 'unsafe-inline', no host
    assert csp["style-src"] == [f"'nonce-{nonce}'"]
    assert all(attrs.get("nonce") == nonce for tag, attrs in page.tags if tag == "style")
    assert "__CSP_NONCE__" not in resp.text
    assert (
        http.get(f"{proxy}/scer/").headers["content-security-policy"]
        != resp.headers["content-security-policy"]
    )
    # Offline: no absolute URL anywhere, no stylesheet, font, image or frame from elsewhere.
    assert "http://" not in resp.text and "https://" not in resp.text
    for tag, attrs in page.tags:
        for name in ("src", "href", "action", "srcset", "poster", "data"):
            value = attrs.get(name)
            assert value is None or (value.startswith("/") and not value.startswith("//")), (tag, name, value)
        assert tag not in ("link", "iframe", "object", "embed", "base")
    assert "@import" not in resp.text and "url(" not in resp.text


def test_script_builds_no_html_from_strings(
    servers: ThreadedServers, start_proxy: Callable[..., str], http: httpx.Client
) -> None:
    _sim, proxy = _sim_proxy(servers, start_proxy)
    script = _Page(http.get(f"{proxy}/scer/").text).script
    assert "createElement" in script and "textContent" in script  # the script is there and builds nodes
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        'setAttribute("style"',
        "DOMParser",
        "createContextualFragment",
    ):
        assert sink not in script, sink
    assert "encodeURIComponent(model)" in script  # the model in the label link is URL-encoded


def test_every_endpoint_and_field_the_page_reads_exists(
    servers: ThreadedServers, start_proxy: Callable[..., str], http: httpx.Client
) -> None:
    sim, proxy = _sim_proxy(servers, start_proxy)
    model = _one_settled_request(http, sim, proxy, {})
    page = _Page(http.get(f"{proxy}/scer/").text)
    script = page.script
    referenced = set(re.findall(r'"(/(?:scer/[^"]*|metrics))"', script))
    referenced |= {attrs["href"] for tag, attrs in page.tags if tag == "a" and attrs.get("href")}
    assert {"/scer/summary", "/scer/requests?limit=50", "/scer/health", "/scer/label/"} <= referenced
    for path in sorted(referenced):
        if path == "/scer/label/":  # built the way the script builds it: encodeURIComponent(model) + ".svg"
            path += quote(model, safe="!'()*") + ".svg"
            assert "%2F" in path  # the simulator's model has a slash: it must still find its label
        resp = http.get(proxy + path)
        assert resp.status_code == 200, (path, resp.text[:200])
    assert page.windows == ["", "1h", "24h", "7d"]
    for since in page.windows:
        summary = http.get(f"{proxy}/scer/summary", params={"since": since} if since else None)
        assert summary.status_code == 200 and summary.json()["totals"]["requests"] == 1
    # Each object the script reads, by the name it gives it there, has every field the script reads.
    summary = http.get(f"{proxy}/scer/summary").json()
    health = http.get(f"{proxy}/scer/health").json()
    records = http.get(f"{proxy}/scer/requests?limit=50").json()
    assert records["data"][0]["energy_j"] > 0 and summary["models"][0]["model"] == model
    objects = {
        "summary": summary,
        "totals": summary["totals"],
        "span": summary["window"],
        "m": summary["models"][0],
        "tenant": summary["tenants"][0],
        "meter": summary["meter"],
        "upstream": summary["meter"]["upstreams"][0],
        "grid": summary["grid"],
        "health": health,
        "ledger": health["ledger"],
        "list": records,
        "r": records["data"][0],
    }
    for name, obj in objects.items():
        fields = set(re.findall(rf"\b{name}\.(\w+)\b", script))
        assert fields, name
        assert fields <= obj.keys(), (name, fields - obj.keys())


def test_admin_token_gates_the_data_but_not_the_page(
    servers: ThreadedServers, start_proxy: Callable[..., str], http: httpx.Client
) -> None:
    sim, proxy = _sim_proxy(servers, start_proxy, server={"admin_token": TOKEN})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    model = _one_settled_request(http, sim, proxy, auth)
    page = http.get(f"{proxy}/scer/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    paths = [
        "/scer/summary",
        "/scer/requests?limit=50",
        "/scer/health",
        "/metrics",
    ]
    for path in paths:
        assert http.get(proxy + path).status_code == 401, path
        assert http.get(proxy + path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
        assert http.get(proxy + path, headers=auth).status_code == 200, path
    # Labels and manifests are public by default (server.public_labels), so a printed QR code opens.
    for path in (f"/scer/label/{quote(model, safe='')}.svg", f"/scer/manifest/{quote(model, safe='')}.yaml"):
        assert http.get(proxy + path).status_code == 200, path
    # The exemptions are the page, the labels and the manifests, and nothing beside them.
    assert http.post(f"{proxy}/scer/").status_code == 401
    assert http.post(f"{proxy}/scer/label/x.svg").status_code == 401
    assert http.get(f"{proxy}/scer/labels").status_code == 401
    assert http.get(f"{proxy}/scer/summary/").status_code == 401
    # The page asks for the token, keeps it for the tab and sends it as a bearer token; a 401 asks again.
    script = _Page(page.text).script
    for needle in ("sessionStorage", '"Bearer "', "Authorization", "resp.status === 401", "askToken("):
        assert needle in script, needle


def test_scer_redirects_to_the_page(
    servers: ThreadedServers, start_proxy: Callable[..., str], http: httpx.Client
) -> None:
    _sim, proxy = _sim_proxy(servers, start_proxy)
    resp = http.get(f"{proxy}/scer")
    assert resp.status_code == 301 and resp.headers["location"] == "/scer/"
    assert http.get(f"{proxy}/scer?since=1h").headers["location"] == "/scer/?since=1h"
    followed = http.get(f"{proxy}/scer", follow_redirects=True)
    assert followed.status_code == 200 and str(followed.url) == f"{proxy}/scer/"
    assert "<title>scer-proxy dashboard</title>" in followed.text
