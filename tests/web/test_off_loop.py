"""Ledger reads and renders run off the event loop: while a slow ``/scer/requests``, ``/scer/summary``,
``/metrics``, label or manifest is in flight, a 1 ms ticker on the proxy's own loop keeps ticking.

A real proxy (``create_app``) serves on the test servers' loop; the ticker runs on that same loop. The
slow parts are made slow on purpose (a sleep wrapped around the real read or render, as a slow disk or
a big ledger would make them), so that each check is deterministic: had the part run on the loop, the
ticker would have stopped for the whole sleep.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import pytest
from aiohttp import web

from scer_proxy import app as app_module
from scer_proxy.carbon.records import Record
from scer_proxy.ledger import aggregate, reads
from scer_proxy.scer import manifest
from scer_proxy.scer.book import RatingsBook
from scer_proxy.web import scer_routes
from scer_proxy.web.keys import LEDGER
from tests.conftest import proxy_config
from tests.ledger.test_ledger import make_record
from tests.servers import ThreadedServers

SLOW_S = 0.4  # how long each slowed part takes
MODEL = "llama-8b"  # one of make_record's models


class _Proxy:
    def __init__(self, servers: ThreadedServers, app: web.Application, url: str) -> None:
        self.servers, self.app, self.url = servers, app, url

    @contextmanager
    def ticking(self) -> Iterator[list[float]]:
        """A 1 ms ticker on the proxy's loop for the duration of the block; yields its lags (s)."""
        lags: list[float] = []
        stop = threading.Event()
        started = threading.Event()

        async def tick() -> None:
            started.set()
            while not stop.is_set():
                t0 = time.perf_counter()
                await asyncio.sleep(0.001)
                lags.append(time.perf_counter() - t0 - 0.001)

        future = asyncio.run_coroutine_threadsafe(tick(), self.servers.loop)
        started.wait(5)
        try:
            yield lags
        finally:
            stop.set()
            future.result(10)


@pytest.fixture
def proxy(servers: ThreadedServers, fake_upstream: str) -> _Proxy:
    config = proxy_config(fake_upstream)
    made: list[web.Application] = []

    def make() -> web.Application:
        made.append(app_module.create_app(config))
        return made[0]

    url = servers.start(make, handler_cancellation=True)
    app = made[0]
    rng = random.Random(7)
    records = [
        r if r.status != "running" else dataclasses.replace(r, status="ok")
        for r in (make_record(i, rng=rng) for i in range(500))
    ]

    async def fill() -> None:
        for r in records:
            app[LEDGER].put(r)
        assert await app[LEDGER].flush()

    servers.call(fill())
    return _Proxy(servers, app, url)


def _slowed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a sleep before its first call (per-record and per-model parts run many times)."""
    calls = iter(range(1 << 30))

    def slow(*args: Any, **kwargs: Any) -> Any:
        if next(calls) == 0:
            time.sleep(SLOW_S)
        return fn(*args, **kwargs)

    return slow


def _get_while_ticking(proxy: _Proxy, path: str) -> tuple[httpx.Response, float, float]:
    """GET ``path`` with the ticker on; the response, its duration and the ticker's worst lag (s)."""
    with proxy.ticking() as lags, httpx.Client(base_url=proxy.url, timeout=30) as http:
        t0 = time.perf_counter()
        resp = http.get(path)
        took = time.perf_counter() - t0
    assert lags, "the ticker never ran"
    return resp, took, max(lags)


SLOW_PARTS = {  # the reads and renders the endpoints run, by where they live
    "recent": (reads, "recent"),
    "get": (reads, "get"),
    "sums": (aggregate.Aggregator, "sums"),
    "to_json": (Record, "to_json"),
    "grade": (RatingsBook, "grade"),
    "prometheus": (scer_routes, "generate_latest"),
    "svg": (manifest, "render_label_svg"),
    "yaml": (manifest, "to_yaml"),
}


@pytest.mark.parametrize(
    ("path", "parts"),
    [
        ("/scer/requests?limit=10000", ["recent", "to_json"]),
        ("/scer/requests/scer-00000003", ["get"]),
        ("/scer/summary", ["sums", "grade"]),
        ("/scer/summary?since=1h&model=llama-8b", ["sums", "grade"]),
        ("/metrics", ["prometheus"]),  # counted in the process: no ledger read
        (f"/scer/label/{quote(MODEL)}.svg", ["sums", "svg"]),
        (f"/scer/manifest/{quote(MODEL)}.yaml", ["sums", "yaml"]),
    ],
)
def test_slow_reads_and_renders_leave_the_loop_free(
    proxy: _Proxy, monkeypatch: pytest.MonkeyPatch, path: str, parts: list[str]
) -> None:
    for name in parts:
        owner, attr = SLOW_PARTS[name]
        monkeypatch.setattr(owner, attr, _slowed(getattr(owner, attr)))
    resp, took, worst_lag = _get_while_ticking(proxy, path)
    assert resp.status_code == 200, resp.text
    assert took >= SLOW_S * len(parts) * 0.9  # the slowed parts did run
    # On the loop, the ticker would have waited out every sleep; off it, a busy machine's noise only.
    assert worst_lag < SLOW_S / 2, (path, worst_lag, took)


def test_concurrent_reads_answer_alike(proxy: _Proxy) -> None:
    """Many reads at once on the read threads: each answers the same as alone (the connections are
    shared under their locks, never used by two threads at once)."""
    paths = ["/scer/requests?limit=500", "/scer/summary", "/metrics", "/scer/requests/scer-00000042"]
    with httpx.Client(base_url=proxy.url, timeout=60) as http:
        alone = {p: http.get(p).content for p in paths}

        def one(i: int) -> tuple[str, bytes]:
            p = paths[i % len(paths)]
            return p, http.get(p).content

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(32)))
    for p, body in results:
        assert _stable(p, body) == _stable(p, alone[p]), p


def _stable(path: str, body: bytes) -> Any:
    """What of an answer does not move between two reads: the summary without its window's end and the
    live meter state, the metrics without the idle gauges, the rest as it is."""
    if path == "/scer/summary":
        data = orjson.loads(body)
        for key in ("window", "meter", "grid", "idle", "idle_energy_j"):
            data.pop(key)
        return data
    if path == "/metrics":
        return [line for line in body.decode().splitlines() if not line.startswith("scer_idle")]
    return body


@pytest.mark.parametrize("n", [0, 1, 499, 500, 501, 1234])
def test_records_json_in_pieces_is_one_documents_bytes(n: int) -> None:
    """The JSON made a few hundred records at a time is byte for byte the JSON of the whole list."""
    rng = random.Random(n)
    records = [make_record(i, rng=rng) for i in range(n)]

    class _Ledger:
        def recent(self, limit: int, overlay: dict[str, Record]) -> list[Record]:
            return records[:limit]

    body = scer_routes._records_json(_Ledger(), 10_000, {})  # type: ignore[arg-type]
    assert body == orjson.dumps({"object": "list", "data": [r.to_json() for r in records]})
