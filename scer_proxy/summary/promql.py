"""``scer-proxy report --prometheus`` (pure): the PromQL queries it sends and the summary built from their answers.

Prometheus scrapes each proxy's ``GET /metrics`` (the metrics of ``scer_proxy.summary.metrics``):
``scer_requests_total{model, upstream, status}``, ``scer_tokens_total{model, upstream, kind}``,
``scer_energy_joules_total{model, upstream, source}``, ``scer_carbon_grams_total{model, upstream, part}``,
``scer_idle_energy_joules_total`` and ``scer_idle_spread_joules_total`` (by upstream) and
``scer_meter_healthy{upstream}``. Every query sums across all scraped proxies (``sum by (model)``); with a
window the counters are read as ``increase(metric[window])``. The answers are summed into the quantities
of ``scer_proxy.carbon.totals`` and its rule gives the figures. The summary has the keys of
``/scer/summary``; what the metrics do not carry (grade, category, tenants, metered and settled counts,
the meter's details, the grid) is null or absent.

The counters hold final figures only and start at zero with each proxy process, so without a window the
figures are those since the proxies started (the window's start is the earliest series' ``_created``).
With a window, ``increase()`` only sees a series from its first scrape on: ``series_began`` lists the
models with a series that began (or restarted) inside the window, and when.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from scer_proxy.carbon.totals import add, sums_of, totals, zero
from scer_proxy.summary.metrics import (
    CARBON,
    COMPLETION,
    COUNTERS,
    EMBODIED,
    ENERGY,
    HEALTHY,
    IDLE,
    IDLE_SPREAD,
    NO_ENERGY,
    OPERATIONAL,
    PROMPT,
    REQUESTS,
    TOKENS,
)

# One vector sample: its labels and its value.
Sample = tuple[dict[str, str], float]

_UNITS_MS = (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1))
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


class PrometheusError(Exception):
    """Prometheus answered something other than a successful instant vector."""


def check_url(url: str) -> str:
    """The base URL (path prefix kept, trailing ``/`` dropped); ValueError for anything but an http(s) URL."""
    try:
        parts = urlsplit(url.strip())
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok, parts = False, urlsplit("")
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or not port_ok
        or parts.query
        or parts.fragment
        or any(c.isspace() for c in url.strip())
    ):
        raise ValueError(f"expected an http(s) URL like http://prometheus:9090, got {url!r}")
    return url.strip().rstrip("/")


def duration(seconds: float) -> str:
    """Seconds as a PromQL range duration in its largest whole unit: 5400 -> ``90m``, 604800 -> ``7d``."""
    ms = round(seconds * 1000)
    if not math.isfinite(seconds) or ms < 1:
        raise ValueError(f"expected a window of at least 1 ms, got {seconds!r} s")
    unit, size = next((u, s) for u, s in _UNITS_MS if ms % s == 0)
    return f"{ms // size}{unit}"


def string(value: str) -> str:
    """A PromQL string literal: double-quoted, with backslash, quote and control characters escaped."""
    return '"' + "".join(_ESCAPES.get(c, c) for c in value) + '"'


def selector(metric: str, matchers: Mapping[str, tuple[str, str]]) -> str:
    """``metric{label="value",...}`` from ``{label: (operator, value)}`` (operators ``=`` and ``!=``)."""
    if not matchers:
        return metric
    return metric + "{" + ",".join(f"{k}{op}{string(v)}" for k, (op, v) in matchers.items()) + "}"


def _sum(
    metric: str, by: tuple[str, ...], matchers: Mapping[str, tuple[str, str]], window: str | None
) -> str:
    inner = selector(metric, matchers)
    if window is not None:
        inner = f"increase({inner}[{window}])"
    return f"sum by ({', '.join(by)}) ({inner})" if by else f"sum({inner})"


def summary_queries(
    since_s: float | None, model: str | None = None, tenant: str | None = None
) -> dict[str, str]:
    """The queries behind one summary, by name: per-model counter sums (``increase`` over ``since_s`` when
    given), the idle energy and what of it was spread into requests (likewise), the meters' health now,
    and when the series began (the latest per model with a window, the earliest of all without)."""
    window = None if since_s is None else duration(since_s)
    only: dict[str, tuple[str, str]] = {}
    if model is not None:
        only["model"] = ("=", model)
    if tenant is not None:
        only["tenant"] = ("=", tenant)
    return {
        "requests": _sum(REQUESTS.total, ("model",), only, window),
        "tokens": _sum(TOKENS.total, ("model", "kind"), only, window),
        "energy": _sum(ENERGY.total, ("model",), {**only, "source": ("!=", NO_ENERGY)}, window),
        "carbon": _sum(CARBON.total, ("model", "part"), only, window),
        "idle": _sum(IDLE.total, (), {}, window),
        "idle_spread": _sum(IDLE_SPREAD.total, (), {}, window),
        "healthy": f"min({HEALTHY.name})",
        "began": f"max by (model) ({selector(REQUESTS.created, only)})"
        if window is not None
        else f"min({selector(REQUESTS.created, only)})",
    }


def tenant_probe_queries() -> dict[str, str]:
    """Per counter, a query that is non-empty only when its series carry a ``tenant`` label."""
    return {m.total: _sum(m.total, ("model",), {"tenant": ("!=", "")}, None) for m in COUNTERS}


def vector(body: Any) -> list[Sample]:
    """The samples of a decoded ``/api/v1/query`` answer; PrometheusError when it is not a successful vector."""
    if not isinstance(body, dict):
        raise PrometheusError("the answer is not a JSON object")
    if body.get("status") != "success":
        raise PrometheusError(f"{body.get('errorType') or 'error'}: {body.get('error') or 'no reason given'}")
    data = body.get("data")
    if (
        not isinstance(data, dict)
        or data.get("resultType") != "vector"
        or not isinstance(data.get("result"), list)
    ):
        kind = data.get("resultType") if isinstance(data, dict) else None
        raise PrometheusError(f"expected an instant vector, got result type {kind!r}")
    samples: list[Sample] = []
    for item in data["result"]:
        try:
            labels, (_, text) = item["metric"], item["value"]
            value = float(text)
        except (KeyError, TypeError, ValueError):
            raise PrometheusError(f"malformed sample {item!r:.200}") from None
        if not isinstance(labels, dict) or not math.isfinite(value):
            raise PrometheusError(f"malformed sample {item!r:.200}")
        samples.append(({str(k): str(v) for k, v in labels.items()}, value))
    return samples


def _by(samples: list[Sample], *labels: str) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for metric, value in samples:
        key = tuple(metric.get(label, "") for label in labels)
        out[key] = out.get(key, 0.0) + value
    return out


def build_summary(results: Mapping[str, list[Sample]], *, start: float | None, end: float) -> dict[str, Any]:
    """The summary from the answers to ``summary_queries`` (by the same names). A model is listed when it has
    at least one request in the window; its energy and carbon are null when none of its requests was metered.

    A model with an energy figure counts as metered with all its output tokens (the metrics have no endpoint
    label, so embeddings' input tokens are not units here); the totals' units are those of metered models.
    """
    requests = _by(results["requests"], "model")
    tokens = _by(results["tokens"], "model", "kind")
    energy = _by(results["energy"], "model")
    carbon = _by(results["carbon"], "model", "part")
    names = sorted(m for (m,), n in requests.items() if round(n) > 0)

    def sums(name: str) -> list[float]:
        completion = tokens.get((name, COMPLETION), 0.0)
        counts = {
            "records": requests[(name,)],
            "prompt_tokens": tokens.get((name, PROMPT), 0.0),
            "completion_tokens": completion,
        }
        if (name,) not in energy:
            return sums_of(**counts)
        operational, embodied = carbon.get((name, OPERATIONAL), 0.0), carbon.get((name, EMBODIED), 0.0)
        return sums_of(
            **counts,
            metered=1,
            metered_completion=completion,
            metered_units=completion,
            energy_j=energy[(name,)],
            carbon_g=operational + embodied,
            carbon_operational_g=operational,
            carbon_embodied_g=embodied,
        )

    per_model = {name: sums(name) for name in names}
    total = zero()
    for s in per_model.values():
        add(total, s)
    idle, spread = results["idle"], results.get("idle_spread", [])
    healthy = results["healthy"]
    began = results.get("began", [])
    late: list[dict[str, Any]] = []
    if start is None:
        start = min((v for _, v in began), default=None)  # the counters' start: the figures are since then
    else:
        late = [
            {"model": labels.get("model", ""), "began_at": at}
            for labels, at in sorted(began, key=lambda s: s[0].get("model", ""))
            if at > start
        ]
    return {
        "window": {"start": start, "end": end},
        "series_began": late,
        "totals": totals(total, counted=False),
        "idle_energy_j": sum(v for _, v in idle) - sum(v for _, v in spread) if idle else None,
        "models": [
            {"model": name, "category": None, "grade": None, **totals(per_model[name], counted=False)}
            for name in names
        ],
        "meter": {"healthy": min(v for _, v in healthy) >= 1.0 if healthy else None},
    }
