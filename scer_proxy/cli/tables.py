"""Aligned text tables, with one rule for numbers, for every table the command line prints."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from scer_proxy.scer.label import format_sig3

Cell = str | int | float | None


def fmt_number(value: Cell) -> str:
    """``-`` for None, integers with thousands separators, floats to 3 significant digits (whole
    numbers from 1,000 up) as plain decimals; text as it is."""
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:,.0f}" if abs(value) >= 1000 else format_sig3(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Cell]], total: Sequence[Cell] | None = None) -> str:
    """Header, a rule, the rows and, below a second rule, the total row. Columns of numbers are
    aligned right, the others left."""
    body = [*rows, *([total] if total is not None else [])]
    numeric = [
        any(isinstance(r[i], int | float) for r in body)
        and all(r[i] is None or isinstance(r[i], int | float) for r in body)
        for i in range(len(header))
    ]
    cells = [list(header), *([fmt_number(v) for v in r] for r in body)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if right else v.ljust(w) for v, w, right in zip(row, widths, numeric, strict=True)
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [line(cells[0]), rule, *(line(c) for c in cells[1 : len(rows) + 1])]
    if total is not None:
        lines += [rule, line(cells[-1])]
    return "\n".join(lines)


SUMMARY_COLUMNS = (
    "model",
    "requests",
    "prompt tokens",
    "completion tokens",
    "Wh",
    "gCO2e",
    "gCO2e per 1,000 output tokens",
    "grade",
)


def summary_rows(summary: dict[str, Any]) -> list[tuple[Cell, ...]]:
    """One row a model, then the total, in the order of :data:`SUMMARY_COLUMNS`."""

    def row(name: str, t: dict[str, Any], grade: str | None) -> tuple[Cell, ...]:
        energy_j = t.get("energy_j")
        return (
            name,
            t["requests"],
            t["prompt_tokens"],
            t["completion_tokens"],
            None if energy_j is None else energy_j / 3600.0,
            t.get("carbon_g"),
            t.get("sci"),
            grade,
        )

    rows = [row(m["model"], m, m.get("grade", "unrated")) for m in summary.get("models", [])]
    rows.append(row("total", summary["totals"], ""))
    return rows


def summary_table(summary: dict[str, Any]) -> str:
    """A ``/scer/summary`` object as the table ``demo`` and ``report`` print: a row a model, then the total."""
    *models, last = summary_rows(summary)
    return table(SUMMARY_COLUMNS, models, last)
