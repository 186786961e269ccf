"""``/scer/label/{model}.svg`` and ``/scer/manifest/{model}.yaml``: the SCER label of a served model and
its Impact Framework manifest, from the ledger's totals for that model (live traffic) and its current
rating; with ``?from=benchmark``, from the model's latest bench submission instead (the label
``scer-proxy label --submission`` writes links here, so its QR code opens the same SCI)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from scer_proxy.carbon.records import Record
from scer_proxy.carbon.sci import Embodied
from scer_proxy.ledger.sqlite import SqliteLedger
from scer_proxy.scer.label import BENCHMARK, LIVE
from scer_proxy.scer.manifest import (
    FROM_PARAM,
    Label,
    hardware_text,
    inputs_from_totals,
    label_from_submission,
    make_label,
)
from scer_proxy.scer.rating import Rated
from scer_proxy.web.keys import ACCOUNTING, CONFIG, LEDGER, METERS, RATINGS
from scer_proxy.web.offload import off_loop
from scer_proxy.wire import openai as wire

PUBLIC_PREFIXES = ("/scer/label/", "/scer/manifest/")


def is_public(request: web.Request) -> bool:
    """Labels and manifests answer without the admin token while ``server.public_labels`` (the default),
    so that the QR code printed on a label opens its manifest for anyone who scans it."""
    return (
        request.app[CONFIG].server.public_labels
        and request.method in ("GET", "HEAD")
        and request.path.startswith(PUBLIC_PREFIXES)
    )


@dataclass(frozen=True)
class _Context:
    """What the label takes from the proxy's state besides the ledger, read on the event loop."""

    model: str
    base_url: str
    task: str
    hardware: str
    embodied: Embodied
    energy_source: str
    pue: float
    rated: Rated | None
    scoring_date: str
    submission: dict[str, Any] | None  # the model's latest bench submission, if any


def _context(app: web.Application, model: str, base_url: str) -> _Context:
    config = app[CONFIG]
    upstream = config.upstream_for(model) or config.upstreams[0]
    meter = app[METERS][upstream.name].describe()
    submission = next((s for s in app[RATINGS].submissions() if s.get("model") == model), None)
    scoring_date = str(submission.get("created_at", ""))[:10] if submission else ""
    return _Context(
        model=model,
        base_url=base_url,
        task=config.rating.category_task,
        hardware=hardware_text(list(meter.get("devices") or [])),
        embodied=app[ACCOUNTING].embodied_for(upstream.name),
        energy_source=str(meter.get("kind", "")),
        pue=config.carbon.pue,
        rated=app[RATINGS].rated(model),
        scoring_date=scoring_date or time.strftime("%Y-%m-%d"),
        submission=submission,
    )


def _make_label(ledger: SqliteLedger, overlay: dict[str, Record], ctx: _Context) -> Label | None:
    """The label of ``ctx.model`` from all its finished, metered requests; None when there are none.
    Blocking (the ledger's summary): on a read thread."""
    summary = ledger.summary_sync(None, ctx.model, None, now=time.time(), overlay=overlay)
    totals = summary["totals"]
    if not totals.get("energy_j") or not totals.get("completion_tokens"):
        return None
    window = summary["window"]
    started = float(window.get("start") or time.time())
    inputs = inputs_from_totals(
        energy_j=float(totals["energy_j"]),
        carbon_operational_g=float(totals["carbon_operational_g"] or 0.0),
        carbon_embodied_g=float(totals["carbon_embodied_g"] or 0.0),
        output_tokens=int(totals["completion_tokens"]),
        embodied=ctx.embodied,
        started_at=started,
        duration_s=float(window["end"]) - started,
        energy_source=ctx.energy_source,
        pue=ctx.pue,
    )
    rated = ctx.rated
    return make_label(
        model=ctx.model,
        task=ctx.task,
        hardware=ctx.hardware,
        inputs=inputs,
        scoring_date=ctx.scoring_date,
        grade=rated.grade if rated else "unrated",
        peers=rated.peers if rated else 0,
        percentile=rated.percentile if rated else None,
        base_url=ctx.base_url,
        figures_from=LIVE,
        grade_j_per_1k_output_tokens=rated.entry.j_per_1k_output_tokens if rated else None,
    )


def _render(
    ledger: SqliteLedger, overlay: dict[str, Record], ctx: _Context, kind: str, figures_from: str
) -> tuple[str, str] | None:
    """The label's SVG (``kind`` ``svg``) or its manifest's YAML, with the content type; None without
    metered requests (or, from the benchmark, without a submission). On a read thread: the summary, the
    QR code and the text are the slow parts."""
    label: Label | None
    if figures_from == BENCHMARK:
        if ctx.submission is None:
            return None
        label = label_from_submission(ctx.submission, rated=ctx.rated, base_url=ctx.base_url)
    else:
        label = _make_label(ledger, overlay, ctx)
    if label is None:
        return None
    return (label.svg, "image/svg+xml") if kind == "svg" else (label.yaml, "application/yaml")


async def _answer(request: web.Request, kind: str) -> web.Response:
    app = request.app
    model = request.match_info["model"]
    origin = {param: name for name, param in FROM_PARAM.items()}.get(request.query.get("from", "traffic"))
    if origin is None:
        return web.Response(
            status=400,
            content_type="application/json",
            body=wire.error_body(
                "from: expected traffic or benchmark", "invalid_request_error", param="from"
            ),
        )
    ctx = _context(app, model, str(request.url.origin()))
    ledger = app[LEDGER]
    try:
        rendered = await off_loop(app, _render, ledger, ledger.overlay(), ctx, kind, origin)
    except ValueError as exc:  # a submission without the figures a label needs
        return web.Response(
            status=422,
            content_type="application/json",
            body=wire.error_body(f"The benchmark submission of {model!r}: {exc}.", "invalid_request_error"),
        )
    if rendered is None:
        missing = "bench submission" if origin == BENCHMARK else "metered requests"
        return web.Response(
            status=404,
            content_type="application/json",
            body=wire.error_body(
                f"No {missing} for the model {model!r} yet.",
                "invalid_request_error",
                param="model",
                code="model_not_found",
            ),
        )
    text, content_type = rendered
    return web.Response(text=text, content_type=content_type, charset="utf-8")


async def label_svg(request: web.Request) -> web.Response:
    return await _answer(request, "svg")


async def manifest_yaml(request: web.Request) -> web.Response:
    return await _answer(request, "yaml")


def add_routes(app: web.Application) -> None:
    # [\s\S], not ".": a name with a line break (from an older ledger) is a name like any other.
    app.router.add_get(r"/scer/label/{model:[\s\S]+}.svg", label_svg)
    app.router.add_get(r"/scer/manifest/{model:[\s\S]+}.yaml", manifest_yaml)
