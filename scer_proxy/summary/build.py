"""The ``/scer/summary`` aggregation (pure): totals per window, per model and per tenant, from records.

The SQLite ledger computes the same figures from its hourly rollups (``SqliteLedger.summary``); this
is the reference the tests check it against, record by record, and ``parse_duration_s`` reads ``since``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from scer_proxy.carbon.records import Record

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration_s(text: str) -> float:
    """``90s``, ``15m``, ``1h``, ``7d``, ``2w`` -> seconds; ValueError naming the text otherwise."""
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise ValueError(f"expected a duration like 30m, 1h or 7d, got {text!r}")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _totals(records: list[Record]) -> dict[str, Any]:
    metered = [r for r in records if r.energy_j is not None]
    energy_j = sum(r.energy_j or 0.0 for r in metered)
    carbon_g = sum(r.carbon_g or 0.0 for r in metered)
    completion = sum(r.completion_tokens for r in records)
    metered_completion = sum(r.completion_tokens for r in metered if r.endpoint != "embeddings")
    metered_units = sum(r.functional_units for r in metered)
    return {
        "requests": len(records),
        "prompt_tokens": sum(r.prompt_tokens for r in records),
        "completion_tokens": completion,
        "energy_j": energy_j if metered else None,
        "carbon_g": carbon_g if metered else None,
        "carbon_operational_g": sum(r.carbon_operational_g or 0.0 for r in metered) if metered else None,
        "carbon_embodied_g": sum(r.carbon_embodied_g or 0.0 for r in metered) if metered else None,
        "energy_j_per_1k_output_tokens": energy_j * 1000.0 / metered_completion
        if metered_completion
        else None,
        "sci": carbon_g * 1000.0 / metered_units if metered_units else None,
        "metered_requests": len(metered),
        "settled_requests": sum(1 for r in metered if r.settled),
    }


def summarize(
    records: Iterable[Record],
    *,
    start: float | None,
    end: float,
    model: str | None = None,
    tenant: str | None = None,
    grades: dict[str, str] | None = None,
    categories: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Aggregate finished records started in [start, end] (optionally one model or tenant)."""
    chosen = [
        r
        for r in records
        if r.status != "running"
        and (start is None or r.started_at >= start)
        and r.started_at <= end
        and (model is None or r.model == model)
        and (tenant is None or r.tenant == tenant)
    ]
    by_model: dict[str, list[Record]] = {}
    by_tenant: dict[str, list[Record]] = {}
    for r in chosen:
        by_model.setdefault(r.model, []).append(r)
        by_tenant.setdefault(r.tenant, []).append(r)
    first = min((r.started_at for r in chosen), default=None)
    return {
        "window": {"start": start if start is not None else first, "end": end},
        "totals": _totals(chosen),
        "models": [
            {
                "model": name,
                "category": (categories or {}).get(name),
                "grade": (grades or {}).get(name, "unrated"),
                **_totals(rs),
            }
            for name, rs in sorted(by_model.items())
        ],
        "tenants": [{"tenant": name, **_totals(rs)} for name, rs in sorted(by_tenant.items())],
    }
