"""Aligned text tables, with one rule for numbers and one for text, for every table the command line
prints; and the rule that makes text from elsewhere (model names from a ledger) safe for a terminal."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from scer_proxy.scer.label import format_sig3

Cell = str | int | float | None

# Beyond the C0 controls (ESC, CR, BEL, ...): DEL, the C1 controls (U+009B is a CSI of its own), the
# line and paragraph separators and the bidirectional marks, embeddings, overrides and isolates
# (which reorder what a terminal shows, as in "Trojan Source").
_UNSAFE_BEYOND_C0 = "\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069"
_UNSAFE = re.compile(f"[\x00-\x1f{_UNSAFE_BEYOND_C0}]")
_UNSAFE_IN_JSON = re.compile(f"[{_UNSAFE_BEYOND_C0}]")  # orjson already escapes the C0 controls


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal_text(text: str) -> str:
    """``text`` safe to print: every control character and bidirectional mark written as an escape
    (``\\x1b``, ``\\x0d``, ``\\u202e``), so that a name from the ledger cannot move the cursor,
    recolour or retitle the terminal, break a table's lines or reorder what is shown."""
    return _UNSAFE.sub(_escape, text)


def terminal_json(text: str) -> str:
    """JSON text (orjson's, C0 controls already escaped) with the other characters of
    ``terminal_text`` escaped as ``\\uXXXX``: the same JSON value, safe to print."""
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


# OWASP's rule for CSV injection: a cell that starts with one of these is a formula to a spreadsheet.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Cell) -> str | int | float:
    """A CSV cell: None empty, numbers as they are, text that a spreadsheet would take for a formula
    prefixed with ``'`` (OWASP), then made safe for a terminal like every printed text."""
    if value is None:
        return ""
    if not isinstance(value, str):
        return value
    return terminal_text("'" + value if value.startswith(_FORMULA_START) else value)


def fmt_number(value: Cell) -> str:
    """``-`` for None, integers with thousands separators, floats to 3 significant digits (whole
    numbers from 1,000 up) as plain decimals; text made safe for a terminal (``terminal_text``)."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return terminal_text(value)
    if isinstance(value, bool):
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
    cells = [[terminal_text(h) for h in header], *([fmt_number(v) for v in r] for r in body)]
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
