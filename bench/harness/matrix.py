"""One row of the accuracy matrix from per-request results (pure, no I/O).

Works on the replay's ``ReplayResult`` and the HTTP harness's ``RequestResult`` alike: any object with
``true_j``, ``settled_j`` and ``header_j``, and optionally ``settled_unc`` and ``header_unc`` (the stated
relative uncertainty of each figure) and ``idle_j`` (or ``settled_idle_j``: the amortized idle share
included in the settled figure). A figure that is None or NaN is missing: its request is left out of
that figure's statistics.

Errors are |figure - truth| / truth. The settled figure is taken on its active part (the figure less
its amortized idle share), since the simulator's truth is the request's active energy; where no idle
share is known (``idle = "separate"``, or a result without the field) that is the figure itself.
Coverage is the share of requests whose error is within their stated uncertainty; the bound ratio is
the median stated uncertainty over the median actual error (1 would be a bound as tight as the error;
a large ratio is a bound that says little).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

TARGETS = (
    "Targets: p50 <= 2 %, p95 <= 8 %, max <= 25 % (replay, up to 90 % of capacity); HTTP p95 <= 12 %; "
    "header p50 <= 5 %, p95 <= 15 %; coverage >= 90 %; bound <= 4x error"
)


def number(value: Any) -> float | None:
    """``value`` as a float, or None when it is None, NaN or not a number."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def quantile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (as ``bench.harness.replay.percentile``); None when empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def idle_share_j(result: Any) -> float:
    """The amortized idle share included in ``result``'s settled figure (0 when unknown)."""
    for name in ("idle_j", "settled_idle_j"):
        value = number(getattr(result, name, None))
        if value is not None:
            return value
    return 0.0


@dataclass(frozen=True)
class Figure:
    """One figure's (settled or header) errors and stated uncertainties, request by request."""

    errors: list[float]  # per request with the figure
    pairs: list[tuple[float, float]]  # (error, stated uncertainty) per request with both

    @property
    def coverage(self) -> float | None:
        if not self.pairs:
            return None
        return sum(1 for error, bound in self.pairs if error <= bound) / len(self.pairs)

    @property
    def bound_ratio(self) -> float | None:
        """Median stated uncertainty over median error, on the requests that have both."""
        if not self.pairs:
            return None
        error = quantile([e for e, _ in self.pairs], 0.5)
        bound = quantile([b for _, b in self.pairs], 0.5)
        if error is None or bound is None or error <= 0:
            return None
        return bound / error


def figure(results: Iterable[Any], which: str, *, active_only: bool = True) -> Figure:
    """The ``settled`` or ``header`` figure's errors against the truth; ``active_only`` takes the settled
    figure less its amortized idle share."""
    errors: list[float] = []
    pairs: list[tuple[float, float]] = []
    for r in results:
        truth = number(getattr(r, "true_j", None))
        value = number(getattr(r, f"{which}_j", None))
        if truth is None or value is None or truth <= 0:
            continue
        if which == "settled" and active_only:
            value -= idle_share_j(r)
        error = abs(value - truth) / truth
        errors.append(error)
        bound = number(getattr(r, f"{which}_unc", None))
        if bound is not None:
            pairs.append((error, bound))
    return Figure(errors, pairs)


@dataclass(frozen=True)
class MatrixRow:
    name: str
    requests: int
    settled_n: int  # requests with a settled figure
    settled_p50: float | None
    settled_p95: float | None
    settled_p99: float | None
    settled_max: float | None
    header_n: int  # requests with a header figure (a cancelled stream has none over HTTP)
    header_p50: float | None
    header_p95: float | None
    header_p99: float | None
    header_max: float | None
    settled_coverage: float | None  # None: no request stated an uncertainty
    header_coverage: float | None
    settled_bound_ratio: float | None  # median stated bound / median error
    header_bound_ratio: float | None
    conservation_rel: float | None  # |attributed + idle - measured| / measured
    settle_p95_readings: float | None = None  # new counter values read after a request's end until it
    settle_max_readings: float | None = None  # settled (None where results do not say)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def matrix_row(
    name: str, results: Iterable[Any], *, conservation_rel: float | None = None, active_only: bool = True
) -> MatrixRow:
    """The row of ``results``: error quantiles, coverage and bound ratio of both figures."""
    results = list(results)
    settled = figure(results, "settled", active_only=active_only)
    header = figure(results, "header", active_only=active_only)
    lags = [v for r in results if (v := number(getattr(r, "settle_readings", None))) is not None]
    return MatrixRow(
        name=name,
        requests=len(results),
        settled_n=len(settled.errors),
        settled_p50=quantile(settled.errors, 0.5),
        settled_p95=quantile(settled.errors, 0.95),
        settled_p99=quantile(settled.errors, 0.99),
        settled_max=max(settled.errors, default=None),
        header_n=len(header.errors),
        header_p50=quantile(header.errors, 0.5),
        header_p95=quantile(header.errors, 0.95),
        header_p99=quantile(header.errors, 0.99),
        header_max=max(header.errors, default=None),
        settled_coverage=settled.coverage,
        header_coverage=header.coverage,
        settled_bound_ratio=settled.bound_ratio,
        header_bound_ratio=header.bound_ratio,
        conservation_rel=conservation_rel,
        settle_p95_readings=quantile(lags, 0.95),
        settle_max_readings=max(lags, default=None),
    )


def conservation_of(report: Any) -> float | None:
    """A report's conservation: its own ``conservation_rel()`` (HTTP), else |attributed + idle -
    measured| / measured from its balances (replay)."""
    method = getattr(report, "conservation_rel", None)
    if callable(method):
        return number(method())
    measured = number(getattr(report, "measured_j", None))
    if not measured:
        return None
    attributed = number(getattr(report, "attributed_j", None)) or 0.0
    idle = number(getattr(report, "idle_j", None)) or 0.0
    return abs(attributed + idle - measured) / measured


def report_row(name: str, report: Any, *, active_only: bool = True) -> MatrixRow:
    """The row of a ``ReplayReport`` or an ``AccuracyReport``."""
    return matrix_row(name, report.results, conservation_rel=conservation_of(report), active_only=active_only)


# -- the printed table ---------------------------------------------------------------------------

_COLUMNS = (
    ("scenario", 24),
    ("n", 5),
    ("set p50", 8),
    ("p95", 8),
    ("p99", 8),
    ("max", 8),
    ("hdr p50", 8),
    ("p95", 8),
    ("cov set", 8),
    ("cov hdr", 8),
    ("bnd/err", 8),
    ("conserv", 8),
    ("lag p95", 7),
    ("max", 4),
)


def _cells(values: list[str]) -> str:
    """The cells, each in its column's width (the name left-aligned, the rest right), one space apart."""
    return " ".join(
        f"{v:<{w}}" if i == 0 else f"{v:>{w}}"
        for i, (v, (_, w)) in enumerate(zip(values, _COLUMNS, strict=True))
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def table_header() -> str:
    """The column names, and a line saying the units."""
    return (
        _cells([name for name, _ in _COLUMNS])
        + "\n"
        + _cells(["", "", *["%"] * 8, "ratio", "rel", "reads", ""])
    )


def format_row(row: MatrixRow) -> str:
    return _cells(
        [
            row.name,
            str(row.requests),
            _pct(row.settled_p50),
            _pct(row.settled_p95),
            _pct(row.settled_p99),
            _pct(row.settled_max),
            _pct(row.header_p50),
            _pct(row.header_p95),
            _pct(row.settled_coverage),
            _pct(row.header_coverage),
            "-" if row.settled_bound_ratio is None else f"{row.settled_bound_ratio:.2f}",
            "-" if row.conservation_rel is None else f"{row.conservation_rel:.1e}",
            "-" if row.settle_p95_readings is None else f"{row.settle_p95_readings:.0f}",
            "-" if row.settle_max_readings is None else f"{row.settle_max_readings:.0f}",
        ]
    )
