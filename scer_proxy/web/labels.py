"""``/scer/label/{model}.svg`` and ``/scer/manifest/{model}.yaml``: the SCER label of a served model and
its Impact Framework manifest, from the ledger's totals for that model and its current rating."""

from __future__ import annotations

import time

from aiohttp import web

from scer_proxy.scer.manifest import Label, inputs_from_totals, make_label
from scer_proxy.web.keys import ACCOUNTING, CONFIG, LEDGER, METERS, RATINGS
from scer_proxy.wire import openai as wire


def hardware_text(devices: list[str]) -> str:
    """'0: NVIDIA H100 80GB HBM3', '1: ...' -> '2 x NVIDIA H100 80GB HBM3'."""
    if not devices:
        return "unknown hardware"
    first = devices[0].split(":", 1)[-1].strip()
    if " x " in first:  # the estimate meter already says "1 x H100 (assumed, not measured)"
        return first
    return f"{len(devices)} x {first}"


async def build_label(app: web.Application, model: str, base_url: str) -> Label | None:
    """The label of ``model`` from all its finished, metered requests; None when there are none."""
    summary = await app[LEDGER].summary(None, model, None, now=time.time())
    totals = summary["totals"]
    if not totals.get("energy_j") or not totals.get("completion_tokens"):
        return None
    config = app[CONFIG]
    upstream = config.upstream_for(model) or config.upstreams[0]
    meter = app[METERS][upstream.name].describe()
    accounting = app[ACCOUNTING]
    window = summary["window"]
    started = float(window.get("start") or time.time())
    inputs = inputs_from_totals(
        energy_j=float(totals["energy_j"]),
        carbon_operational_g=float(totals["carbon_operational_g"] or 0.0),
        carbon_embodied_g=float(totals["carbon_embodied_g"] or 0.0),
        output_tokens=int(totals["completion_tokens"]),
        embodied=accounting.embodied_for(upstream.name),
        started_at=started,
        duration_s=float(window["end"]) - started,
        energy_source=str(meter.get("kind", "")),
        pue=config.carbon.pue,
    )
    rated = app[RATINGS].rated(model)
    submission = next((s for s in app[RATINGS].submissions() if s.get("model") == model), None)
    scoring_date = str(submission.get("created_at", ""))[:10] if submission else time.strftime("%Y-%m-%d")
    return make_label(
        model=model,
        task=config.rating.category_task,
        hardware=hardware_text(list(meter.get("devices") or [])),
        inputs=inputs,
        scoring_date=scoring_date or time.strftime("%Y-%m-%d"),
        grade=rated.grade if rated else "unrated",
        peers=rated.peers if rated else 0,
        percentile=rated.percentile if rated else None,
        base_url=base_url,
    )


async def _label_for(request: web.Request) -> Label | web.Response:
    model = request.match_info["model"]
    label = await build_label(request.app, model, str(request.url.origin()))
    if label is None:
        return web.Response(
            status=404,
            content_type="application/json",
            body=wire.error_body(
                f"No metered requests for the model {model!r} yet.",
                "invalid_request_error",
                param="model",
                code="model_not_found",
            ),
        )
    return label


async def label_svg(request: web.Request) -> web.Response:
    label = await _label_for(request)
    if isinstance(label, web.Response):
        return label
    return web.Response(text=label.svg, content_type="image/svg+xml", charset="utf-8")


async def manifest_yaml(request: web.Request) -> web.Response:
    label = await _label_for(request)
    if isinstance(label, web.Response):
        return label
    return web.Response(text=label.yaml, content_type="application/yaml", charset="utf-8")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/scer/label/{model:.+}.svg", label_svg)
    app.router.add_get("/scer/manifest/{model:.+}.yaml", manifest_yaml)
