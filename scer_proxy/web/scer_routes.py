"""``/scer/summary``, ``/scer/requests``, ``/scer/health`` and ``/metrics``."""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from scer_proxy import __version__
from scer_proxy.carbon.records import Record
from scer_proxy.ledger.sqlite import SqliteLedger
from scer_proxy.meters.sampler import distinct_meters
from scer_proxy.scer.book import RatingsBook
from scer_proxy.summary import metrics as pm
from scer_proxy.summary.build import parse_duration_s
from scer_proxy.summary.metrics import Metric, Snapshot
from scer_proxy.web.keys import (
    ACCOUNTING,
    CONFIG,
    COUNTERS,
    GRID,
    LEDGER,
    METER_NOTES,
    METERS,
    RATINGS,
    STARTED_AT,
)
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


def carbon_info(app: web.Application) -> dict[str, Any]:
    """Health's ``carbon`` object: the configuration records are computed under (the PUE, the idle
    policy, each upstream's embodied figures), which ``scer-proxy bench`` writes into its submission."""
    config = app[CONFIG]
    return {
        "pue": config.carbon.pue,
        "idle_policy": config.attribution.idle,
        "embodied": {
            u.name: dataclasses.asdict(app[ACCOUNTING].embodied_for(u.name)) for u in config.upstreams
        },
    }


async def health(request: web.Request) -> web.Response:
    meter = meter_info(request.app)
    ledger = request.app[LEDGER].health() | {"pending_settlement": request.app[ACCOUNTING].pending}
    return _json(
        {
            "status": "ok" if meter["healthy"] and ledger["healthy"] else "degraded",
            "meter": meter,
            "grid": request.app[GRID].describe(),
            "carbon": carbon_info(request.app),
            "ledger": ledger,
        }
    )


@dataclass(frozen=True)
class _Gauges:
    """What ``/metrics`` reads of the meters and the grid, on the loop (all figures PUE included but the
    measured energy, which is the meter's own)."""

    upstreams: list[str]
    idle_j: dict[str, float]  # upstream label -> measured idle energy so far (a counter)
    idle_spread_j: dict[str, float]  # -> the part of it spread into requests (a counter)
    idle_balance_j: dict[str, float]  # -> waiting to be spread (a gauge)
    measured_j: dict[str, float]  # -> the meter's counted energy, before PUE (a counter)
    healthy: dict[str, bool]  # upstream name -> its meter answers
    grid_source: str
    grid_intensity_g_per_kwh: float
    started_at: float  # Unix seconds the process's counters began


def _gauges(app: web.Application) -> _Gauges:
    """The meters' figures now, one entry per timeline (upstreams sharing one are named together)."""
    pue = app[CONFIG].carbon.pue
    by_timeline: dict[int, list[str]] = {}
    for name, meter in app[METERS].items():
        by_timeline.setdefault(id(meter.timeline), []).append(name)
    idle: dict[str, float] = {}
    spread: dict[str, float] = {}
    balance: dict[str, float] = {}
    measured: dict[str, float] = {}
    meters = app[METERS]
    for names in by_timeline.values():
        meter = meters[names[0]]
        label = ",".join(sorted(names))
        timeline = meter.timeline
        idle[label] = (timeline.idle_j + timeline.idle.accrued_j) * pue
        spread[label] = timeline.idle.spread_j * pue
        balance[label] = timeline.idle_balance_j * pue
        if meter.samples:
            measured[label] = timeline.measured_j
    grid = app[GRID].current()
    return _Gauges(
        upstreams=list(meters),
        idle_j=idle,
        idle_spread_j=spread,
        idle_balance_j=balance,
        measured_j=measured,
        healthy={name: meter.healthy for name, meter in app[METERS].items()},
        grid_source=grid.source,
        grid_intensity_g_per_kwh=grid.intensity_g_per_kwh,
        started_at=app[STARTED_AT],
    )


class _Collector:
    """The families of ``/metrics`` from a snapshot of the counters and the gauges."""

    def __init__(self, snapshot: Snapshot, gauges: _Gauges) -> None:
        self.snapshot = snapshot
        self.gauges = gauges

    def _counter(self, metric: Metric, values: dict[tuple[str, ...], float]) -> CounterMetricFamily:
        family = CounterMetricFamily(metric.name, metric.help, labels=list(metric.labels))
        created = self.snapshot.created
        for labels, value in sorted(values.items()):
            family.add_metric(list(labels), value, created=created.get((metric.name, labels)))
        return family

    def _per_upstream(self, metric: Metric, values: dict[str, float]) -> CounterMetricFamily:
        family = CounterMetricFamily(metric.name, metric.help, labels=["upstream"])
        for name, value in sorted(values.items()):
            family.add_metric([name], value, created=self.gauges.started_at)
        return family

    def _gauge(self, metric: Metric, values: dict[str, float]) -> GaugeMetricFamily:
        family = GaugeMetricFamily(metric.name, metric.help, labels=list(metric.labels))
        for label, value in sorted(values.items()):
            family.add_metric([label], value)
        return family

    def collect(self) -> Any:
        snap, gauges = self.snapshot, self.gauges
        for metric in pm.COUNTERS:
            yield self._counter(metric, snap.counters.get(metric, {}))
        histogram = HistogramMetricFamily(
            pm.REQUEST_ENERGY.name, pm.REQUEST_ENERGY.help, labels=list(pm.REQUEST_ENERGY.labels)
        )
        bounds = [*(f"{b:g}" for b in snap.bounds), "+Inf"]
        for labels, h in sorted(snap.histograms.items()):
            histogram.add_metric(
                list(labels),
                list(zip(bounds, (float(c) for c in h.cumulative()), strict=True)),
                h.sum,
            )
        yield histogram
        yield self._per_upstream(pm.IDLE, gauges.idle_j)
        yield self._per_upstream(pm.IDLE_SPREAD, gauges.idle_spread_j)
        yield self._per_upstream(pm.MEASURED, gauges.measured_j)
        yield self._gauge(pm.IDLE_BALANCE, gauges.idle_balance_j)
        unsettled = {u: snap.unsettled.get(u, (0, 0.0)) for u in gauges.upstreams}
        yield self._gauge(pm.UNSETTLED_REQUESTS, {u: float(n) for u, (n, _j) in unsettled.items()})
        yield self._gauge(pm.UNSETTLED_ENERGY, {u: j for u, (_n, j) in unsettled.items()})
        yield self._gauge(pm.HEALTHY, {u: 1.0 if ok else 0.0 for u, ok in gauges.healthy.items()})
        yield self._gauge(pm.GRID, {gauges.grid_source: gauges.grid_intensity_g_per_kwh})
        yield self._gauge(pm.BUILD, {__version__: 1.0})


def _metrics_text(snapshot: Snapshot, gauges: _Gauges) -> bytes:
    """The Prometheus text (on a read thread)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snapshot, gauges))
    return generate_latest(registry)


async def metrics(request: web.Request) -> web.Response:
    """``/metrics``: the in-process counters (never re-summed from the ledger) and the gauges. The
    snapshot is taken on the loop, where records are counted; the text is made on a read thread."""
    app = request.app
    body = await off_loop(app, _metrics_text, app[COUNTERS].snapshot(), _gauges(app))
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
