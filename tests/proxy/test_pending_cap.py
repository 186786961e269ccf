"""Records waiting for their settled figure are capped (``storage.max_pending``): with the meter down no
reading settles them, so beyond the cap the oldest is written settled with its response-time figure,
flagged ``meter_outage``, and leaves the timeline (memory stays bounded while the meter is down)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from scer_proxy.meters import MeterError, Reading
from tests.fake_upstream import MODEL
from tests.servers import ThreadedServers

CAP = 3


class DownMeter:
    """A meter that answers its first read (a baseline, so responses carry a figure), then fails."""

    source = "simulated"

    def __init__(self) -> None:
        self.reads = 0

    async def read(self) -> Reading:
        self.reads += 1
        if self.reads > 1:
            raise MeterError("the meter is down (the test)")
        return Reading(time.monotonic(), 1000.0)

    def describe(self) -> dict[str, Any]:
        return {"kind": "simulated", "devices": []}

    async def close(self) -> None:
        return None


def test_pending_settlements_are_capped_while_the_meter_is_down(
    servers: ThreadedServers, fake_upstream: str, start_proxy: Callable[..., str]
) -> None:
    proxy = start_proxy(
        fake_upstream, storage={"path": ":memory:", "max_pending": CAP}, meters={"up": DownMeter()}
    )
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    ids = []
    for _ in range(CAP + 4):
        resp = httpx.post(f"{proxy}/v1/chat/completions", json=body)
        assert resp.status_code == 200
        ids.append(resp.headers["X-SCER-Request-Id"])

    records = [httpx.get(f"{proxy}/scer/requests/{rid}").json() for rid in ids]
    oldest, newest = records[:-CAP], records[-CAP:]
    for record in oldest:
        assert record["settled"] is True and "meter_outage" in record["flags"]
        assert record["energy_j"] is not None and record["energy_j"] >= 0, "the response-time figure is kept"
    for record in newest:
        assert record["settled"] is False and "meter_outage" not in record["flags"]

    health = httpx.get(f"{proxy}/scer/health").json()
    assert health["ledger"]["pending_settlement"] == CAP
    (meter,) = health["meter"]["upstreams"]
    assert meter["pending_requests"] == CAP, "the timeline forgot the records settled as they were"
