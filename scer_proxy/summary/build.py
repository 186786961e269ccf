"""The ``/scer/summary`` aggregation (pure): totals per window, per model and per tenant, from records.

The SQLite ledger computes the same figures in SQL from its hourly rollups (``SqliteLedger.summary``);
this sums the same quantities in Python, is the reference the tests check the ledger against, and
``parse_duration_s`` reads ``since``. Both apply the one totals rule of ``scer_proxy.carbon.totals``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from scer_proxy.carbon.records import Record
from scer_proxy.carbon.totals import add_to, contribution, summary_body

_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*(s|m|h|d|w)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_DURATION_S = 100 * 365 * 86400.0  # a century: no record is older, and Unix seconds stay exact


def parse_duration_s(text: str) -> float:
    """``90s``, ``15m``, ``1h``, ``7d``, ``2w`` -> seconds, at most ``MAX_DURATION_S``; ValueError naming
    the text otherwise (negative, not a number, beyond a century)."""
    match = _DURATION.match(text.strip().lower())
    shown = text if len(text) <= 40 else text[:40] + "..."
    if not match:
        raise ValueError(f"expected a duration like 30m, 1h or 7d, got {shown!r}")
    seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if not seconds <= MAX_DURATION_S:  # also inf, from a number too long for a float
        raise ValueError(f"expected a duration of at most {MAX_DURATION_S / 86400:.0f}d, got {shown!r}")
    return seconds


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
    groups: dict[tuple[str, ...], list[float]] = {}
    first: float | None = None
    for r in records:
        if (
            r.status != "running"
            and (start is None or r.started_at >= start)
            and r.started_at <= end
            and (model is None or r.model == model)
            and (tenant is None or r.tenant == tenant)
        ):
            add_to(groups, (r.model, r.tenant), contribution(r))
            first = r.started_at if first is None else min(first, r.started_at)
    return summary_body(
        groups,
        start=start if start is not None else first,
        end=end,
        grades=grades,
        categories=categories,
    )
