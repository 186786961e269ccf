"""``bench/loop_lag.py``: its misbehaving upstream answers what each row needs, and a quick run of the
whole benchmark (real processes) prints its table."""

from __future__ import annotations

import gzip
import re
import subprocess
import sys

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from bench.loop_lag import QUICK, inputs, make_upstream_app, quantile, ticker_lags
from tests.servers import ROOT


async def test_the_upstream_misbehaves_as_each_row_needs() -> None:
    sizes = QUICK
    by_name = {i.name: i for i in inputs(sizes)}
    async with TestClient(TestServer(make_upstream_app(sizes))) as client:
        prompt = by_name["prompt"]
        resp = await client.post(prompt.path, data=prompt.body, headers=prompt.headers)
        assert resp.status == 400 and "usage" not in await resp.json()
        assert len(prompt.body or b"") >= sizes.prompt_mb * 1_000_000

        bomb = by_name["bomb"]
        resp = await client.post(bomb.path, data=bomb.body, headers=bomb.headers, auto_decompress=False)
        raw = await resp.read()
        assert resp.headers["Content-Encoding"] == "gzip" and len(raw) < sizes.bomb_mib * 1024 * 1024 / 100
        inflated = orjson.loads(gzip.decompress(raw))
        assert len(inflated["choices"][0]["message"]["content"]) == sizes.bomb_mib * 1024 * 1024

        sse = by_name["sse"]
        resp = await client.post(sse.path, data=sse.body, headers=sse.headers)
        events = (await resp.read()).split(b"\n\n")
        assert max(len(e) for e in events) >= sizes.sse_event_mb * 1_000_000
        assert events[-2] == b"data: [DONE]" and b'"usage"' in events[-3]

        body = by_name["body"]
        resp = await client.post(body.path, data=body.body, headers=body.headers)
        assert len(await resp.read()) >= sizes.body_mb * 1_000_000


def test_quantile() -> None:
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([float(i) for i in range(100)], 0.99) == 99.0


def test_a_quick_run_prints_the_table() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "bench/loop_lag.py",
            "--quick",
            "--idle-s",
            "0.3",
            "--rows",
            "2000",
            "--repeat",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("input"))
    rows = lines[header + 2 : header + 2 + 8]
    assert rows[0].startswith("idle (nothing in flight)")
    assert any(r.startswith("/scer/requests?limit=2000 (2,000 rows)") for r in rows)
    for r in rows[1:]:
        cells = re.split(r"\s{2,}", r.strip())
        assert len(cells) == 12 and cells[1] in ("200", "400", "502"), r  # every input answered
        assert int(cells[3]) > 0, r  # the ticker inside the proxy ticked
    assert "target p99 < 50 ms (the ticker's):" in out.stdout


def test_the_ticker_lag_is_weighted_by_time() -> None:
    """A 500 ms stall among 1 ms ticks is half of a 1 s window: p99 and max near 500 ms, not 1 tick in
    500; without it, the lags are the ticks' own."""
    ticks = [(i * 0.001, 0.0) for i in range(500)]  # 1 ms ticks, on time, for 0.5 s
    ticks.append((0.5, 0.499))  # a tick due at 0.501 that woke at 1.0
    count, lags = ticker_lags(ticks, [(0.0, 1.0)])
    assert count == 501 and len(lags) == 1000
    assert quantile(lags, 0.99) > 0.45 and max(lags) == pytest.approx(0.499)
    assert quantile(lags, 0.4) == 0.0
    _count, calm = ticker_lags([(i * 0.001, 0.0002) for i in range(1000)], [(0.0, 1.0)])
    assert max(calm) == pytest.approx(0.0002)
