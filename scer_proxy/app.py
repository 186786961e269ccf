"""Wiring: ``create_app`` builds every resource of the proxy; one ``cleanup_ctx`` per resource, no globals."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import aiohttp
import structlog
from aiohttp import web

from scer_proxy.attribution.timeline import Timeline, TimelineConfig
from scer_proxy.config import Config
from scer_proxy.grid.providers import build_grid_source
from scer_proxy.ledger.sqlite import SqliteLedger
from scer_proxy.meters import Meter
from scer_proxy.meters.nvml import NvmlMeter
from scer_proxy.meters.sampler import UpstreamMeter, distinct_meters
from scer_proxy.meters.select import Choice, build_meter, share_hardware
from scer_proxy.proxy.accounting import Accounting
from scer_proxy.proxy.handler import ProxyHandler
from scer_proxy.proxy.serving import preload_tokenizer
from scer_proxy.proxy.upstreams import Upstreams
from scer_proxy.scer.book import RatingsBook
from scer_proxy.summary.metrics import Counters, literal_models
from scer_proxy.web import admin, dashboard, labels, offload, scer_routes
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
    UPSTREAMS,
)
from scer_proxy.wire import openai as wire

log = structlog.get_logger("scer_proxy.app")


def create_app(
    config: Config,
    *,
    meters: Mapping[str, Meter | None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
    environ: Mapping[str, str] | None = None,
) -> web.Application:
    """The proxy application. ``meters`` (per upstream name) replaces the configured meters in tests;
    ``environ`` (default ``os.environ``) is where the Electricity Maps token is read."""
    app = web.Application(
        client_max_size=config.server.max_body_bytes,
        middlewares=[_errors, _admin_gate] if config.server.admin_token else [_errors],
    )
    app[CONFIG] = config
    # /metrics counts every record the ledger is given, once its figure is final (scer_proxy.summary.metrics).
    counters = Counters(
        configured=literal_models(config.model_patterns),
        max_models=config.metrics.max_models,
        max_unsettled=2 * config.storage.max_pending,  # accounting settles beyond max_pending
        wall_clock=wall_clock,
    )
    app[COUNTERS] = counters
    app[STARTED_AT] = wall_clock()
    ledger = SqliteLedger(
        config.storage.path,
        flush_interval_s=config.storage.flush_interval_ms / 1000.0,
        max_pending=config.storage.memory_records,
        retention_days=config.storage.retention_days,
        on_corrupt=config.storage.on_corrupt,
        on_put=counters.observe,
    )
    app[LEDGER] = ledger
    upstreams = Upstreams(config.upstreams)
    app[UPSTREAMS] = upstreams
    app[METERS] = {}
    app[METER_NOTES] = {}
    # Built here, without I/O, so that a bad provider setting (a missing token) fails before serving.
    grid = build_grid_source(
        config.carbon, os.environ if environ is None else environ, clock=clock, wall_clock=wall_clock
    )
    app[GRID] = grid
    ratings = RatingsBook()
    app[RATINGS] = ratings

    async def ledger_ctx(app: web.Application) -> AsyncIterator[None]:
        await ledger.open()  # first in, last out: closed (final flush) after the meters settle
        yield
        await ledger.close()

    async def upstream_ctx(app: web.Application) -> AsyncIterator[None]:
        await upstreams.open()
        yield
        await upstreams.close()

    async def grid_ctx(app: web.Application) -> AsyncIterator[None]:
        grid.start()  # the first fetch runs in the background; the table serves until it succeeds
        yield
        await grid.close()

    async def meter_ctx(app: web.Application) -> AsyncIterator[None]:
        weight = config.attribution.prefill_weight
        choices: dict[str, Choice] = {}
        for upstream in config.upstreams:
            if meters is not None and upstream.name in meters:
                choices[upstream.name] = Choice(meters[upstream.name], None, "given")
            else:
                choices[upstream.name] = await build_meter(config, upstream)
        # Upstreams on one board share one meter runtime and one timeline: its energy is split among all
        # their requests by one rule, and counted once (docs/method.md#shared-hardware).
        for group in await share_hardware(choices):
            timeline = Timeline(
                TimelineConfig(
                    prefill_weight=None if isinstance(weight, str) else weight,
                    idle=config.attribution.idle,
                    idle_window_s=config.attribution.idle_window_s,
                )
            )
            upstream_meter = UpstreamMeter(
                group.names[0],
                group.choice.meter,
                timeline,
                interval_s=config.meter.interval_ms / 1000.0,
                on_settled=lambda name, share: app[ACCOUNTING].settled(name, share),
                clock=clock,
                estimator=group.choice.estimator,
                shared_by=group.names,
            )
            for name in group.names:
                app[METERS][name] = upstream_meter
                app[METER_NOTES][name] = group.choice.note
        upstream_meters = app[METERS]
        app[ACCOUNTING] = Accounting(
            config,
            ledger,
            upstream_meters,
            grid,
            tenant_salt=ledger.tenant_salt,
            wall_clock=wall_clock,
            rating_for=ratings.grade,
        )
        for upstream_meter in distinct_meters(app[METERS]).values():
            if upstream_meter.samples:
                await upstream_meter.sample_once()  # a first reading, so the first request has a baseline
                meter = upstream_meter.meter
                if isinstance(meter, NvmlMeter):
                    # The first read detected the counter's update period: never sample faster than it.
                    upstream_meter.interval_s = meter.recommended_interval_s(upstream_meter.interval_s)
            upstream_meter.start()
        yield
        for upstream_meter in distinct_meters(app[METERS]).values():
            await upstream_meter.close()

    app.on_startup.append(preload_tokenizer)
    app.cleanup_ctx.append(ledger_ctx)
    app.cleanup_ctx.append(upstream_ctx)
    app.cleanup_ctx.append(grid_ctx)
    app.cleanup_ctx.append(meter_ctx)

    proxy_handler: ProxyHandler | None = (
        None  # one for the app's life (it keeps the model -> upstream routes)
    )

    async def v1(request: web.Request) -> web.StreamResponse:
        nonlocal proxy_handler
        if proxy_handler is None:  # accounting exists once the meters have started
            proxy_handler = ProxyHandler(config, upstreams, request.app[ACCOUNTING])
        return await proxy_handler.handle(request)

    app.router.add_route("*", "/v1/{tail:.*}", v1)
    app.router.add_route("*", "/v1", v1)
    scer_routes.add_routes(app)
    labels.add_routes(app)
    dashboard.add_routes(app)
    offload.install(app)  # after the ledger's cleanup_ctx: reads end before it closes
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Nothing crashes the server: unexpected errors answer 500 in the OpenAI error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            kind = "invalid_request_error" if exc.status < 500 else "server_error"
            return web.Response(
                status=exc.status,
                body=wire.error_body(exc.reason, kind),
                content_type="application/json",
                headers={k: v for k, v in exc.headers.items() if k.lower() == "allow"},
            )
        raise
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        raise
    except Exception:
        log.exception("handler_error", path=request.path)
        return web.Response(
            status=500,
            body=wire.error_body("The proxy failed to handle the request.", "server_error"),
            content_type="application/json",
        )


@web.middleware
async def _admin_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """With ``server.admin_token`` set (only then is this middleware installed), ``/scer/*`` and ``/metrics``
    need the bearer token (but the dashboard page, which carries no data, and labels and manifests while
    ``server.public_labels``); ``/v1/*`` never."""
    token = request.app[CONFIG].server.admin_token
    if (
        token
        and (request.path.startswith("/scer") or request.path == "/metrics")
        and not dashboard.is_public(request)
        and not labels.is_public(request)
    ):
        if not admin.bearer_matches(request.headers.get("Authorization", ""), token):
            return web.Response(
                status=401,
                body=wire.error_body(
                    "Missing or wrong admin token.", "authentication_error", code="invalid_admin_token"
                ),
                content_type="application/json",
                headers={"WWW-Authenticate": "Bearer"},
            )
    return await handler(request)
