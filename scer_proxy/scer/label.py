"""The SCER label (pure, no I/O): an SVG of 260 x 364 px in the manner of an appliance energy label.

It shows what the contract lists: the model, its task, the hardware, the scoring date, the
deployment's own SCI as ``<value> gCO2eq per 1,000 output tokens`` (never a "/"), the energy in Wh
per 1,000 output tokens, the grade on SCER's A to C scale (or ``unrated``), the number of peers, the
SCI version followed (``SCI 1.1``), a QR code (ISO/IEC 18004, made with segno, error correction M,
4-module quiet zone) that encodes exactly the manifest's URL (where that URL is too long for a code
that scans at this size, a note says so in its place), and a note that SCER is a draft
specification of the Green Software Foundation.

The grade and the figures below it come from different places, and the label names both: the grade
ranks the benchmark's GPU energy per 1,000 output tokens among its peers (the figure ranked is shown
beside it); the SCI and energy lines are headed with where they come from, ``LIVE TRAFFIC`` (the
proxy's ledger) or ``BENCHMARK`` (the submission). Every text colour has a contrast of at least 4.5:1
(WCAG 2.1 AA) against what it is drawn on.

Only basic SVG is used (``rect``, ``path``, ``text``/``tspan``, ``g``, ``title``, ``desc``) with a
generic sans-serif font stack, so any renderer shows it; every font size is at least 7 px. Text that
might not fit (model, task, hardware) is cut with an ellipsis, measured with Helvetica/Arial advance
widths (Liberation Sans has the same metrics) and a safety margin.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_UP, Decimal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import segno

WIDTH = 260
HEIGHT = 364
GRADES = ("A", "B", "C")
# WCAG AA (4.5:1) for the text on each: white on A's green 5.45, dark on B's yellow 12.0, on C's orange 7.6.
GRADE_COLORS = {"A": "#007a3d", "B": "#ffd200", "C": "#f7941d"}
GRADE_TEXT = {"A": "#ffffff", "B": "#1a1a1a", "C": "#1a1a1a"}
GRADE_RANGE = {"A": "above 90th", "B": "60th to 90th", "C": "below 60th"}
HEADER = "#0e5a36"
FONT = "Helvetica, Arial, 'Liberation Sans', 'DejaVu Sans', sans-serif"
VALUE_UNIT = "gCO2eq per 1,000 output tokens"
ENERGY_UNIT = "Wh per 1,000 output tokens"
DRAFT_NOTE = "SCER is a draft specification of the Green Software Foundation"
QR_ERROR = "m"
QR_BORDER = 4
QR_BOX = 96.0  # px for the code and its quiet zone, from the divider (247) to the footer (345)
# The largest version with at least 1 px a module in the box: 17 is 85 modules, 93 with the quiet
# zone. It holds 504 bytes of URL; a longer one (a model name of some 450 characters) gets a note
# in the code's place instead.
QR_MAX_VERSION = 17
QR_MAX_BYTES = 2331  # what version 40 holds at level M: a longer URL is refused without trying
QR_MISSING = ("No QR code:", "the manifest's URL", "is too long for one")
_LEFT = 12.0
_RIGHT = 248.0

_MEASURED = {"nvml": "NVML", "dcgm": "DCGM", "rapl": "RAPL"}

LIVE, BENCHMARK = "live traffic", "benchmark"  # where a label's SCI and energy come from
FIGURES = (LIVE, BENCHMARK)


@dataclass(frozen=True, kw_only=True)
class LabelData:
    """Everything the label shows. Numbers are per 1,000 output tokens; ``scoring_date`` is ISO 8601."""

    model: str
    task: str
    hardware: str  # e.g. "1 x NVIDIA H100 80GB HBM3"
    scoring_date: str  # "YYYY-MM-DD"
    sci_g_per_1k_output_tokens: float
    energy_wh_per_1k_output_tokens: float
    grade: str  # A | B | C | unrated
    peers: int
    manifest_url: str
    percentile: float | None = None
    sci_version: str = "SCI 1.1"
    energy_source: str = ""  # nvml | dcgm | rapl | simulated | estimate | ...
    grid_intensity_g_per_kwh: float | None = None
    figures_from: str = LIVE  # where the SCI and energy lines come from (FIGURES)
    grade_j_per_1k_output_tokens: float | None = None  # the benchmark figure the grade ranks

    def __post_init__(self) -> None:
        if self.figures_from not in FIGURES:
            raise ValueError(f"figures_from must be one of {FIGURES}, got {self.figures_from!r}")
        if self.grade not in (*GRADES, "unrated"):
            raise ValueError(f"grade must be A, B, C or unrated, got {self.grade!r}")
        for name in ("sci_g_per_1k_output_tokens", "energy_wh_per_1k_output_tokens"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.peers < 0:
            raise ValueError(f"peers must be >= 0, got {self.peers}")
        if not self.manifest_url:
            raise ValueError("manifest_url is empty")
        date.fromisoformat(self.scoring_date[:10])

    @property
    def value_text(self) -> str:
        """The label's SCI figure as shown: 3 significant digits, a plain decimal."""
        return format_sig3(self.sci_g_per_1k_output_tokens)

    @property
    def value_line(self) -> str:
        """``<value> gCO2eq per 1,000 output tokens``."""
        return f"{self.value_text} {VALUE_UNIT}"

    @property
    def grade_lines(self) -> tuple[str, str]:
        """What the grade ranks, in two lines: the benchmark's figure, then its percentile among the peers."""
        figure = self.grade_j_per_1k_output_tokens
        ranked = f"{format_sig3(figure)} J per 1,000 output tokens" if figure is not None else None
        if self.grade in GRADES:
            first = f"Grade {self.grade}: benchmark GPU energy" + (
                f", {ranked}" if ranked else " per 1,000 tokens"
            )
            second = f"among {_peers_text(self.peers)} in its category"
            if self.percentile is not None:
                second = f"{_ordinal(round(self.percentile))} percentile " + second
            return first, second
        first = f"unrated: {_peers_text(self.peers)} in its category"
        if ranked is None:
            return first, "Grades rank benchmark GPU energy per 1,000 tokens"
        return first, f"Benchmark GPU energy: {ranked}"

    @property
    def figures_heading(self) -> str:
        """The heading of the SCI and energy lines, naming where they come from."""
        return f"{self.figures_from.upper()}: SOFTWARE CARBON INTENSITY"

    @property
    def energy_line(self) -> str:
        """``<value> Wh per 1,000 output tokens``."""
        return f"{format_sig3(self.energy_wh_per_1k_output_tokens)} {ENERGY_UNIT}"


def format_sig3(value: float) -> str:
    """``value`` to 3 significant digits as a plain decimal (no exponent): 0.18 -> ``0.180``, 12345 -> ``12300``."""
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {value!r}")
    if value == 0:
        return "0"
    d = Decimal(repr(value))
    for _ in range(2):  # a second pass when rounding carries into a new digit (0.9996 -> 1.00)
        exponent = d.adjusted() - 2
        rounded = d.quantize(Decimal(1).scaleb(exponent), rounding=ROUND_HALF_UP)
        if rounded.adjusted() == d.adjusted():
            break
        d = rounded
    text = format(rounded, "f")
    return text


def qr_code(url: str) -> segno.QRCode | None:
    """The label's QR code for ``url``: ISO/IEC 18004 (not Micro QR), error correction M; None when
    ``url`` needs a version above ``QR_MAX_VERSION`` (a long model name), whose modules would be too
    small to scan in the label's box.

    segno is imported here, not at module level: its writers pull in ``urllib.request`` (and with it
    the ``socket`` module) through ``xml.sax.saxutils``, which the pure core's import check forbids.
    """
    import segno

    if len(url.encode("utf-8")) > QR_MAX_BYTES:  # beyond any version's capacity: no need to try
        return None
    try:
        code = segno.make(url, error=QR_ERROR, boost_error=False, micro=False)
    except segno.DataOverflowError:
        return None
    return code if isinstance(code.version, int) and code.version <= QR_MAX_VERSION else None


def qr_modules(url: str) -> list[list[bool]]:
    """The QR matrix for ``url`` with its 4-module quiet zone, True where a module is dark; ValueError
    when ``url`` is too long for the label's QR code."""
    code = qr_code(url)
    if code is None:
        raise ValueError(f"a URL of {len(url)} characters is too long for the label's QR code")
    return _matrix(code)


def _matrix(code: segno.QRCode) -> list[list[bool]]:
    return [[bool(cell) for cell in row] for row in code.matrix_iter(scale=1, border=QR_BORDER)]


def qr_path(modules: list[list[bool]]) -> str:
    """An SVG path (module units) filling each horizontal run of dark modules: ``M x y h w v1 H x z``."""
    parts: list[str] = []
    for y, row in enumerate(modules):
        x = 0
        while x < len(row):
            if row[x]:
                start = x
                while x < len(row) and row[x]:
                    x += 1
                parts.append(f"M{start} {y}h{x - start}v1H{start}z")
            else:
                x += 1
    return "".join(parts)


# Helvetica/Arial advance widths in 1/1000 em for printable ASCII (32..126).
_WIDTHS = [
    278,
    278,
    355,
    556,
    556,
    889,
    667,
    191,
    333,
    333,
    389,
    584,
    278,
    333,
    278,
    278,
    556,
    556,
    556,
    556,
    556,
    556,
    556,
    556,
    556,
    556,
    278,
    278,
    584,
    584,
    584,
    556,
    1015,
    667,
    667,
    722,
    722,
    667,
    611,
    778,
    722,
    278,
    500,
    667,
    556,
    833,
    722,
    778,
    667,
    778,
    722,
    667,
    611,
    722,
    667,
    944,
    667,
    667,
    611,
    278,
    278,
    278,
    469,
    556,
    333,
    556,
    556,
    500,
    556,
    556,
    278,
    556,
    556,
    222,
    222,
    500,
    222,
    833,
    556,
    556,
    556,
    556,
    333,
    500,
    278,
    556,
    500,
    722,
    500,
    500,
    500,
    334,
    260,
    334,
    584,
]
_SAFETY = 1.05
_BOLD = 1.08


def _units(ch: str) -> int:
    """The advance width of one character in 1/1000 em."""
    code = ord(ch)
    if 32 <= code <= 126:
        return _WIDTHS[code - 32]
    if unicodedata.east_asian_width(ch) in ("W", "F"):
        return 1000
    if unicodedata.combining(ch):
        return 0
    return 667


def _px(units: int, size: float, bold: bool) -> float:
    return units / 1000.0 * size * _SAFETY * (_BOLD if bold else 1.0)


def text_width(text: str, size: float, *, bold: bool = False) -> float:
    """Estimated rendered width of ``text`` in px at ``size`` px (a little generous, never narrow)."""
    return _px(sum(_units(ch) for ch in text), size, bold)


def fit(text: str, size: float, max_width: float, *, bold: bool = False) -> str:
    """``text`` cut with an ellipsis so that it fits in ``max_width`` px (whitespace runs made one
    space). One pass over the text: a model name of any length costs as little as a short one."""
    text = " ".join(text.split())
    units = [_units(ch) for ch in text]
    if _px(sum(units), size, bold) <= max_width:
        return text
    total = _units("\u2026")
    cut = 0
    for width in units:
        if _px(total + width, size, bold) > max_width:
            break
        total += width
        cut += 1
    return text[:cut].rstrip() + "\u2026"


_XML_INVALID = re.compile("[^\u0009\u000a\u000d\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def esc(text: str) -> str:
    """XML-escape text for element content and double-quoted attributes (invalid XML chars dropped)."""
    text = _XML_INVALID.sub("", text)
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _peers_text(n: int) -> str:
    return f"{n} peer" if n == 1 else f"{n} peers"


def energy_source_text(source: str) -> str:
    """How the label names the energy figure's source."""
    key = source.strip().lower()
    if key in _MEASURED:
        return f"measured ({_MEASURED[key]})"
    if key == "simulated":
        return "simulated GPU meter"
    if key == "estimate":
        return "estimated, not measured"
    return key or "not stated"


def _text(
    x: float,
    y: float,
    content: str,
    size: float,
    *,
    bold: bool = False,
    fill: str = "#1a1a1a",
    anchor: str = "start",
    extra: str = "",
) -> str:
    weight = ' font-weight="bold"' if bold else ""
    anchor_attr = f' text-anchor="{anchor}"' if anchor != "start" else ""
    return (
        f'<text x="{x:g}" y="{y:g}" font-size="{size:g}"{weight}{anchor_attr} fill="{fill}"{extra}>'
        f"{content}</text>"
    )


def _arrow(x: float, y: float, w: float, h: float, tip: float) -> str:
    """A right-pointing arrow bar (path data)."""
    return f"M{x:g} {y:g}h{w - tip:g}l{tip:g} {h / 2:g}l{-tip:g} {h / 2:g}h{-(w - tip):g}z"


def render_label_svg(data: LabelData) -> str:
    """The label as an SVG document (a string), 260 x 364 px."""
    out: list[str] = []
    add = out.append
    title = f"SCER label: {data.model}"
    summary = (
        f"{data.model}, task {data.task}, hardware {data.hardware}, scored {data.scoring_date}: "
        f"from {data.figures_from}, {data.value_line}, {data.energy_line}; grade {data.grade} "
        f"({' '.join(data.grade_lines)}); follows {data.sci_version}. {DRAFT_NOTE}."
    )
    add(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-labelledby="scer-title scer-desc" '
        f'font-family="{FONT}">'
    )
    add(f'<title id="scer-title">{esc(title)}</title>')
    add(f'<desc id="scer-desc">{esc(summary)}</desc>')

    # Frame and header band.
    add(f'<rect x="1" y="1" width="{WIDTH - 2}" height="{HEIGHT - 2}" rx="6" fill="#ffffff"/>')
    add('<g id="header">')
    add(f'<path d="M1 35V7a6 6 0 0 1 6-6h{WIDTH - 14}a6 6 0 0 1 6 6v28z" fill="{HEADER}"/>')
    add(_text(_LEFT, 26, "SCER", 21, bold=True, fill="#ffffff", extra=' letter-spacing="1.5"'))
    add(_text(_RIGHT, 16, "ENERGY &amp; CARBON LABEL", 8, bold=True, fill="#ffffff", anchor="end"))
    add(_text(_RIGHT, 28, "LLM inference", 8, fill="#d8efe2", anchor="end"))
    add("</g>")

    # Identity: model, task, hardware.
    width = _RIGHT - _LEFT
    add('<g id="identity">')
    add(_text(_LEFT, 52, esc(fit(data.model, 13, width, bold=True)), 13, bold=True))
    task = fit(data.task, 9.5, width - text_width("Task ", 8.5))
    add(
        f'<text x="{_LEFT:g}" y="66" font-size="9.5" fill="#1a1a1a">'
        f'<tspan font-size="8.5" fill="#555555">Task </tspan>{esc(task)}</text>'
    )
    hardware = fit(data.hardware, 9.5, width - text_width("Hardware ", 8.5))
    add(
        f'<text x="{_LEFT:g}" y="79" font-size="9.5" fill="#1a1a1a">'
        f'<tspan font-size="8.5" fill="#555555">Hardware </tspan>{esc(hardware)}</text>'
    )
    add("</g>")
    add(f'<path d="M{_LEFT:g} 86.5H{_RIGHT:g}" stroke="#bbbbbb" stroke-width="1"/>')

    # The A to C scale and the pointer.
    add('<g id="scale">')
    rows = {"A": 92.0, "B": 117.0, "C": 142.0}
    widths = {"A": 92.0, "B": 112.0, "C": 132.0}
    h = 22.0
    for g in GRADES:
        y = rows[g]
        stroke = ' stroke="#1a1a1a" stroke-width="1.5"' if data.grade == g else ""
        add(f'<path d="{_arrow(_LEFT, y, widths[g], h, 11)}" fill="{GRADE_COLORS[g]}"{stroke}/>')
        add(_text(_LEFT + 8, y + 17, g, 16, bold=True, fill=GRADE_TEXT[g]))
        add(_text(_LEFT + 26, y + 14.5, GRADE_RANGE[g], 7.5, fill=GRADE_TEXT[g]))
    if data.grade in GRADES:
        y = rows[data.grade]
        add(f'<g id="pointer"><path d="M176 {y + h / 2:g}l11 {-h / 2:g}h61v{h:g}h-61z" fill="#1a1a1a"/>')
        add(_text(218, y + 18, data.grade, 18, bold=True, fill="#ffffff", anchor="middle") + "</g>")
    else:
        add(
            '<g id="pointer"><rect x="162" y="108" width="86" height="40" rx="3" fill="#eeeeee" '
            'stroke="#777777" stroke-width="1" stroke-dasharray="3 2"/>'
        )
        add(_text(205, 125, "unrated", 12, bold=True, fill="#444444", anchor="middle"))
        add(_text(205, 139, "needs 2 or more peers", 7, fill="#555555", anchor="middle") + "</g>")
    add("</g>")

    # What the grade ranks (the benchmark's figure), apart from the figures below.
    first, second = data.grade_lines
    add('<g id="peers">')
    add(_text(_LEFT, 174, esc(fit(first, 7.5, width)), 7.5, fill="#333333"))
    add(_text(_LEFT, 184, esc(fit(second, 7.5, width)), 7.5, fill="#333333"))
    add("</g>")
    add(f'<path d="M{_LEFT:g} 188.5H{_RIGHT:g}" stroke="#bbbbbb" stroke-width="1"/>')

    # The value line (one text element, never a "/") and the energy line.
    add('<g id="value">')
    heading = fit(data.figures_heading, 7.5, width - 0.3 * len(data.figures_heading), bold=True)
    add(
        _text(
            _LEFT,
            199,
            esc(heading),
            7.5,
            bold=True,
            fill="#555555",
            extra=' id="figures-from" letter-spacing="0.3"',
        )
    )
    unit_size = 9.5
    unit_w = text_width(" " + VALUE_UNIT, unit_size)
    number = data.value_text
    number_size = min(26.0, max(11.0, (width - unit_w) / max(text_width(number, 1.0, bold=True), 1e-9)))
    add(
        f'<text id="value-line" x="{_LEFT:g}" y="223" fill="#1a1a1a">'
        f'<tspan font-size="{number_size:.3g}" font-weight="bold">{esc(number)}</tspan>'
        f'<tspan font-size="{unit_size:g}"> {VALUE_UNIT}</tspan></text>'
    )
    energy = format_sig3(data.energy_wh_per_1k_output_tokens)
    add(
        f'<text id="energy-line" x="{_LEFT:g}" y="240" font-size="9.5" fill="#1a1a1a">'
        f'<tspan font-weight="bold">{esc(energy)}</tspan> {ENERGY_UNIT}</text>'
    )
    add("</g>")

    # The QR code, bottom right: whole pixels per module where the box allows (crisp at 1x and 2x).
    code = qr_code(data.manifest_url)
    modules = None if code is None else _matrix(code)
    n = len(modules) if modules is not None else 0
    scale = 1.0 if modules is None else (2.0 if n * 2 <= QR_BOX else QR_BOX / n)
    side = n * scale if modules is not None else QR_BOX
    x0 = round(254 - side)
    y0 = round(248 + (QR_BOX - side) / 2)
    add(f'<path d="M{_LEFT:g} 247.5H{x0 + 4 * scale:g}" stroke="#bbbbbb" stroke-width="1"/>')

    # Details on the left of the QR code.
    column = x0 - _LEFT
    add('<g id="details">')
    add(
        f'<text x="{_LEFT:g}" y="264" font-size="9" fill="#1a1a1a">Follows '
        f'<tspan font-weight="bold" font-size="10">{esc(data.sci_version)}</tspan></text>'
    )
    add(_text(_LEFT, 279, f"Scored {esc(data.scoring_date)}", 9))
    add(_text(_LEFT, 293, esc(fit(f"Energy: {energy_source_text(data.energy_source)}", 8.5, column)), 8.5))
    if data.grid_intensity_g_per_kwh is not None:
        grid = f"Grid: {format_sig3(data.grid_intensity_g_per_kwh)} gCO2eq per kWh"
        add(_text(_LEFT, 307, esc(fit(grid, 8.5, column)), 8.5))
    hint = "Scan for the full manifest" if modules is not None else "Manifest: /scer/manifest/"
    add(_text(_LEFT, 325, hint, 7.5, fill="#555555"))
    add("</g>")

    if modules is not None:
        add(
            f'<g id="qr" transform="translate({x0:g} {y0:g}) scale({scale:.6g})" shape-rendering="crispEdges">'
        )
        add(
            f'<title>QR code: the manifest of this label</title><rect width="{n}" height="{n}" fill="#ffffff"/>'
        )
        add(f'<path d="{qr_path(modules)}" fill="#000000"/></g>')
    else:  # the URL is too long for a code that scans: say so where the code would be
        add(
            f'<g id="qr-missing"><rect x="{x0 + 4:g}" y="{y0 + 4:g}" width="{side - 8:g}" height="{side - 8:g}" '
            'fill="#ffffff" stroke="#777777" stroke-width="1" stroke-dasharray="3 2"/>'
        )
        middle = x0 + side / 2
        for i, line in enumerate(QR_MISSING):
            add(_text(middle, y0 + side / 2 - 8 + 11 * i, line, 7.5, fill="#444444", anchor="middle"))
        add("</g>")

    # Footer: the draft note.
    add('<g id="footer">')
    add(f'<path d="M1 345h{WIDTH - 2}v12a6 6 0 0 1 -6 6h{-(WIDTH - 14)}a6 6 0 0 1 -6 -6z" fill="#f0f0f0"/>')
    add(f'<path d="M1 345H{WIDTH - 1}" stroke="#bbbbbb" stroke-width="1"/>')
    add(_text(WIDTH / 2, 357, DRAFT_NOTE, 7.2, fill="#333333", anchor="middle"))
    add("</g>")
    add(
        f'<rect x="1" y="1" width="{WIDTH - 2}" height="{HEIGHT - 2}" rx="6" fill="none" '
        f'stroke="#1a1a1a" stroke-width="2"/>'
    )
    add("</svg>")
    return "\n".join(out) + "\n"
