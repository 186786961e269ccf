"""``/scer/summary``, ``/scer/requests``, ``/scer/health`` and ``/metrics``."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from scer_proxy.carbon.records import Record
from scer_proxy.ledger.sqlite import SqliteLedger
from scer_proxy.meters.sampler import distinct_meters
from scer_proxy.scer.book import RatingsBook
from scer_proxy.summary.build import parse_duration_s
from scer_proxy.summary.metrics import COUNTERS, HEALTHY, IDLE, IDLE_BALANCE, series
from scer_proxy.web.keys import ACCOUNTING, CONFIG, GRID, LEDGER, METER_NOTES, METERS, RATINGS
from scer_proxy.web.offload import off_loop
from scer_proxy.wire import openai as wire


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _bad(message: str, param: str) -> web.Response:
    return web.Response(
        status=400,
        body=wire.error_body(message, "invalid_request_error", param=param),
        content_type="application/json",
    )


DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
_LIMIT = re.compile(r"[0-9]{1,6}")


def parse_limit(text: str) -> int:
    """``/scer/requests``' ``limit``: an integer from 1 to ``MAX_LIMIT`` in ASCII digits; ValueError
    naming the text otherwise (a negative, a fraction, a huge number, other scripts' digits)."""
    if _LIMIT.fullmatch(text) and 1 <= int(text) <= MAX_LIMIT:
        return int(text)
    shown = text if len(text) <= 40 else text[:40] + "..."
    raise ValueError(f"limit: expected an integer from 1 to {MAX_LIMIT}, got {shown!r}")


def meter_info(app: web.Application) -> dict[str, Any]:
    """The summary's ``meter`` object: kind, devices, update period, age of the last reading, errors."""
    meters = [
        m.describe() | {"note": app[METER_NOTES].get(name)}
        for name, m in distinct_meters(app[METERS]).items()
    ]
    kinds = sorted({m["kind"] for m in meters})
    ages = [m["last_reading_age_ms"] for m in meters if m["last_reading_age_ms"] is not None]
    periods = [m["update_period_ms"] for m in meters if m["update_period_ms"] is not None]
    return {
        "kind": kinds[0] if len(kinds) == 1 else ",".join(kinds),
        "devices": [d for m in meters for d in m["devices"]],
        "update_period_ms": max(periods) if periods else None,
        "last_reading_age_ms": max(ages) if ages else None,
        "healthy": all(m["healthy"] for m in meters),
        "errors": sum(m["errors"] for m in meters),
        "upstreams": meters,
    }


def idle_energy_j(app: web.Application) -> float:
    """Measured energy left unattributed: idle under ``separate``; under ``amortize`` the balance still
    waiting to be spread over requests."""
    pue = app[CONFIG].carbon.pue
    meters = distinct_meters(app[METERS]).values()
    return sum((m.timeline.idle_j + m.timeline.idle_balance_j) * pue for m in meters)


def idle_info(app: web.Application) -> dict[str, Any]:
    """The summary's ``idle`` object, summed over upstreams with PUE applied as in ``idle_energy_j``.

    ``ratio`` is the idle-to-active energy ratio of the window now: one upstream's own, for several the
    mean of theirs weighted by their active energy (None where no upstream has one yet)."""
    config = app[CONFIG]
    pue = config.carbon.pue
    meters = distinct_meters(app[METERS]).values()
    states = [m.idle_state() for m in meters]
    windows = {m.timeline.idle.window_s for m in meters}  # the timelines' own (all built from the config)
    rated = [(s["ratio"], s["active_j"] or 0.0) for s in states if s["ratio"] is not None]
    ratio: float | None = None
    if len(rated) == 1:
        ratio = rated[0][0]
    elif rated and sum(w for _r, w in rated) > 0:
        ratio = sum(r * w for r, w in rated) / sum(w for _r, w in rated)
    return {
        "policy": config.attribution.idle,
        "window_s": windows.pop() if len(windows) == 1 else config.attribution.idle_window_s,
        "separate_j": sum((s["separate_j"] or 0.0) * pue for s in states),
        "balance_j": sum((s["balance_j"] or 0.0) * pue for s in states),
        "spread_j": sum((s["spread_j"] or 0.0) * pue for s in states),
        "ratio": ratio,
    }


async def summary(request: web.Request) -> web.Response:
    app = request.app
    now = time.time()
    since_s = None
    since = request.query.get("since")
    if since:
        try:
            since_s = parse_duration_s(since)
        except ValueError as exc:
            return _bad(str(exc), "since")
    model = request.query.get("model") or None
    tenant = request.query.get("tenant") or None
    live = {  # the meters' and the grid's state belongs to the loop: read it here
        "idle_energy_j": idle_energy_j(app),
        "idle": idle_info(app),
        "meter": meter_info(app),
        "grid": app[GRID].describe(),
    }
    ledger = app[LEDGER]
    body = await off_loop(
        app, _summary_json, ledger, app[RATINGS], ledger.overlay(), since_s, model, tenant, now, live
    )
    return web.Response(body=body, content_type="application/json")


def _summary_json(
    ledger: SqliteLedger,
    ratings: RatingsBook,
    overlay: dict[str, Record],
    since_s: float | None,
    model: str | None,
    tenant: str | None,
    now: float,
    live: dict[str, Any],
) -> bytes:
    """The summary's JSON (on a read thread; the book's ratings are replaced whole, never changed)."""
    body = ledger.summary_sync(since_s, model, tenant, now=now, overlay=overlay)
    for entry in body["models"]:
        entry["grade"] = ratings.grade(entry["model"])
        entry["category"] = ratings.category(entry["model"])
    body.update(live)
    return orjson.dumps(body)


async def request_record(request: web.Request) -> web.Response:
    app = request.app
    request_id = request.match_info["request_id"]
    record = app[LEDGER].unwritten(request_id) or await off_loop(app, app[LEDGER].stored, request_id)
    if record is None:
        return web.Response(
            status=404,
            content_type="application/json",
            body=wire.error_body(
                f"No request with id {request_id!r}.",
                "invalid_request_error",
                param="request_id",
                code="request_not_found",
            ),
        )
    return _json(record.to_json())


async def request_list(request: web.Request) -> web.Response:
    try:
        limit = parse_limit(request.query.get("limit", str(DEFAULT_LIMIT)))
    except ValueError as exc:
        return _bad(str(exc), "limit")
    ledger = request.app[LEDGER]
    body = await off_loop(request.app, _records_json, ledger, limit, ledger.overlay())
    return web.Response(body=body, content_type="application/json")


_DUMP_CHUNK = 500  # records serialized in one orjson call, which holds the GIL throughout


def _records_json(ledger: SqliteLedger, limit: int, overlay: dict[str, Record]) -> bytes:
    """``/scer/requests``' JSON (on a read thread). The list is serialized a few hundred records at a
    time, the same bytes as one call, so that the loop's thread gets the GIL between the calls rather
    than after all 10,000 records' worth."""
    records = ledger.recent(limit, overlay)
    parts = [
        orjson.dumps([r.to_json() for r in records[i : i + _DUMP_CHUNK]])[1:-1]
        for i in range(0, len(records), _DUMP_CHUNK)
    ]
    return b'{"object":"list","data":[' + b",".join(parts) + b"]}"


async def health(request: web.Request) -> web.Response:
    meter = meter_info(request.app)
    ledger = request.app[LEDGER].health() | {"pending_settlement": request.app[ACCOUNTING].pending}
    return _json(
        {
            "status": "ok" if meter["healthy"] and ledger["healthy"] else "degraded",
            "meter": meter,
            "grid": request.app[GRID].describe(),
            "ledger": ledger,
        }
    )


@dataclass(frozen=True)
class _Gauges:
    """The gauges of ``/metrics`` that come from the meters, read on the loop."""

    idle_j: float
    idle_balance_j: float
    healthy: dict[str, bool]  # upstream name -> its meter answers


class _LedgerCollector:
    """Prometheus metrics computed from the ledger at scrape time (per model and energy source)."""

    def __init__(self, rows: list[dict[str, Any]], gauges: _Gauges) -> None:
        self.rows = rows  # SqliteLedger.metrics_rows(): sums per model x status x energy source
        self.gauges = gauges

    def collect(self) -> Any:
        families = {m.name: CounterMetricFamily(m.name, m.help, labels=list(m.labels)) for m in COUNTERS}
        agg: dict[tuple[str, tuple[str, str]], float] = {}
        for row in self.rows:
            for metric, labels, value in series(row):
                key = (metric.name, labels)
                agg[key] = agg.get(key, 0.0) + value
        for (name, labels), value in sorted(agg.items()):
            families[name].add_metric(list(labels), value)
        yield from families.values()
        idle = GaugeMetricFamily(IDLE.name, IDLE.help)
        idle.add_metric([], self.gauges.idle_j)
        yield idle
        balance = GaugeMetricFamily(IDLE_BALANCE.name, IDLE_BALANCE.help)
        balance.add_metric([], self.gauges.idle_balance_j)
        yield balance
        healthy = GaugeMetricFamily(HEALTHY.name, HEALTHY.help, labels=list(HEALTHY.labels))
        for name, ok in self.gauges.healthy.items():
            healthy.add_metric([name], 1.0 if ok else 0.0)
        yield healthy


def _metrics_text(ledger: SqliteLedger, overlay: dict[str, Record], gauges: _Gauges) -> bytes:
    """The Prometheus text (on a read thread): the ledger's sums, then the gauges."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_LedgerCollector(ledger.metrics_rows_sync(overlay), gauges))
    return generate_latest(registry)


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    gauges = _Gauges(
        idle_j=idle_energy_j(app),
        idle_balance_j=idle_info(app)["balance_j"],
        healthy={name: meter.healthy for name, meter in app[METERS].items()},
    )
    body = await off_loop(app, _metrics_text, app[LEDGER], app[LEDGER].overlay(), gauges)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def submissions_post(request: web.Request) -> web.Response:
    """Register a bench submission (``scer-proxy bench`` posts it): the model's grade follows from it."""
    try:
        submission = await request.json(loads=orjson.loads)
        rated = request.app[RATINGS].add(submission)
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        return _bad(f"not a scer-proxy bench submission: {exc.__class__.__name__}: {exc}", "body")
    return _json(
        {
            "model": rated.entry.name,
            "category": str(rated.entry.category),
            "rank": rated.rank,
            "peers": rated.peers,
            "percentile": rated.percentile,
            "grade": rated.grade,
        },
        status=201,
    )


async def submissions_get(request: web.Request) -> web.Response:
    return _json({"object": "list", "data": request.app[RATINGS].submissions()})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/scer/submissions", submissions_post)
    app.router.add_get("/scer/submissions", submissions_get)
    app.router.add_get("/scer/summary", summary)
    app.router.add_get("/scer/requests", request_list)
    app.router.add_get("/scer/requests/{request_id}", request_record)
    app.router.add_get("/scer/health", health)
    app.router.add_get("/metrics", metrics)
