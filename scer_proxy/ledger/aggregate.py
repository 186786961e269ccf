"""Aggregation queries: the summary and the ``/metrics`` rows in SQL, from the hourly rollup.

Only the partial hour at the start of a ``since`` window is read from raw rows, so a million records sum
in milliseconds. Records not yet written (the overlay) are added in Python, and the stored figure of the
same ids taken away, in one snapshot. The sums become figures by the rule of ``scer_proxy.carbon.totals``.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scer_proxy.carbon.records import Record
from scer_proxy.carbon.totals import QUANTITIES, add_to, contribution, summary_body
from scer_proxy.ledger.reads import stored
from scer_proxy.ledger.schema import BUCKET_S, raw_sums_sql, summed


@dataclass(frozen=True)
class Filter:
    start: float | None  # Unix seconds; records started at or after it
    model: str | None
    tenant: str | None

    def accepts(self, r: Record) -> bool:
        return (
            r.status != "running"
            and (self.start is None or r.started_at >= self.start)
            and (self.model is None or r.model == self.model)
            and (self.tenant is None or r.tenant == self.tenant)
        )

    def where(self) -> tuple[str, list[Any]]:
        clauses, params = ["status != 'running'"], []
        if self.model is not None:
            clauses.append("model = ?")
            params.append(self.model)
        if self.tenant is not None:
            clauses.append("tenant = ?")
            params.append(self.tenant)
        return " AND ".join(clauses), params


_ROLLUP_SUMS = ", ".join(summed(q, q) for q in QUANTITIES)


class Aggregator:
    """The aggregations, on a connection of their own (None until the database is open: the overlay only).
    Run on worker threads; the lock keeps them one at a time on the connection."""

    def __init__(self) -> None:
        self.conn: sqlite3.Connection | None = None
        self.lock = threading.Lock()

    def sums(
        self, group_by: Sequence[str], flt: Filter, overlay: dict[str, Record]
    ) -> dict[tuple[str, ...], list[float]]:
        """Sums (``QUANTITIES`` order) per group of ``group_by`` (rollup key columns other than hour) over
        the records the filter accepts: rollup buckets, raw rows of the partial first bucket, and the
        overlay's delta."""
        acc: dict[tuple[str, ...], list[float]] = {}
        conn = self.conn
        keys = ", ".join(group_by)
        n = len(group_by)
        where, params = flt.where()
        if conn is not None:
            with self.lock:
                conn.execute("BEGIN")
                try:
                    if flt.start is None:
                        bucket_where, bucket_params = where, params
                    else:
                        first = int(flt.start // BUCKET_S)
                        bucket_where, bucket_params = f"hour > ? AND {where}", [first, *params]
                        for row in conn.execute(
                            f"SELECT {keys}, {raw_sums_sql()} FROM requests WHERE started_at >= ? "
                            f"AND started_at < ? AND {where} GROUP BY {keys}",
                            [flt.start, (first + 1) * BUCKET_S, *params],
                        ):
                            add_to(acc, tuple(row[:n]), row[n:])
                    for row in conn.execute(
                        f"SELECT {keys}, {_ROLLUP_SUMS} FROM rollup WHERE {bucket_where} GROUP BY {keys}",
                        bucket_params,
                    ):
                        add_to(acc, tuple(row[:n]), row[n:])
                    old = stored(conn, list(overlay)) if overlay else []
                finally:
                    conn.execute("COMMIT")
            for r in old:
                if flt.accepts(r):
                    add_to(acc, tuple(getattr(r, k) for k in group_by), contribution(r), -1.0)
        for r in overlay.values():
            if flt.accepts(r):
                add_to(acc, tuple(getattr(r, k) for k in group_by), contribution(r))
        return {k: v for k, v in acc.items() if round(v[0]) != 0}

    def first_started(self, flt: Filter, overlay: dict[str, Record]) -> float | None:
        """The earliest ``started_at`` of the records the filter accepts (first non-empty bucket, then raw)."""
        first: float | None = None
        conn = self.conn
        if conn is not None:
            where, params = flt.where()
            with self.lock:
                (hour,) = conn.execute(
                    f"SELECT min(hour) FROM rollup WHERE records > 0 AND {where}", params
                ).fetchone()
                if hour is not None:
                    (first,) = conn.execute(
                        f"SELECT min(started_at) FROM requests WHERE started_at >= ? AND {where}",
                        [hour * BUCKET_S, *params],
                    ).fetchone()
        for r in overlay.values():
            if flt.accepts(r) and (first is None or r.started_at < first):
                first = r.started_at
        return first

    def summary(
        self,
        overlay: dict[str, Record],
        *,
        start: float | None,
        end: float,
        model: str | None,
        tenant: str | None,
        grades: dict[str, str] | None,
        categories: dict[str, str] | None,
    ) -> dict[str, Any]:
        """The ``/scer/summary`` keys over finished records started at ``start`` or later (all when None)."""
        flt = Filter(start, model, tenant)
        groups = self.sums(("model", "tenant"), flt, overlay)
        return summary_body(
            groups,
            start=start if start is not None else self.first_started(flt, overlay),
            end=end,
            grades=grades,
            categories=categories,
        )

    def metrics_rows(self, overlay: dict[str, Record]) -> list[dict[str, Any]]:
        """All-time sums per model x status x energy source, each a dict of the group and ``QUANTITIES``."""
        groups = self.sums(("model", "status", "energy_source"), Filter(None, None, None), overlay)
        return [
            {"model": m, "status": s, "energy_source": e, **dict(zip(QUANTITIES, sums, strict=True))}
            for (m, s, e), sums in sorted(groups.items())
        ]
