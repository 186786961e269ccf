"""The Prometheus metrics of ``GET /metrics``: names, help, labels, and the in-process counters behind them.

One definition for both ends: the proxy's collector (``scer_proxy.web.scer_routes``) renders what
``Counters`` holds; ``report --prometheus`` (``scer_proxy.summary.promql``) queries the same names and
labels to sum them back into the quantities of ``scer_proxy.carbon.totals``.

The counters only go up. Each is incremented once per record, when the record's figure is final (settled
by the meter's reading after its end, or finished without an energy figure), by that final figure; a
record whose figure still waits for the meter is in the ``scer_unsettled_*`` gauges instead, so a
settlement that lowers a response-time figure never lowers a counter. Nothing is recomputed from the
ledger, so its retention never lowers them either. They start at zero when the process starts (each
series' ``_created`` sample says when it began), as Prometheus expects of a counter: ``increase()`` and
``rate()`` treat the restart as a reset and stay exact, where a start from the ledger's totals (lowered by
retention since) would read as a reset to a large value and be counted again in full.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from scer_proxy.carbon.records import Record


@dataclass(frozen=True, slots=True)
class Metric:
    name: str  # the family name; a counter's samples are ``<name>_total``
    help: str
    labels: tuple[str, ...] = ()

    @property
    def total(self) -> str:
        """The name of a counter's samples, as Prometheus stores and queries them."""
        return f"{self.name}_total"

    @property
    def created(self) -> str:
        """The name of a counter's ``_created`` samples (Unix seconds the series began)."""
        return f"{self.name}_created"


REQUESTS = Metric(
    "scer_requests", "Metered requests finished, counted once final", ("model", "upstream", "status")
)
TOKENS = Metric(
    "scer_tokens", "Tokens of metered requests, counted once final", ("model", "upstream", "kind")
)
ENERGY = Metric(
    "scer_energy_joules",
    "Energy attributed to requests, PUE included, final figures",
    ("model", "upstream", "source"),
)
CARBON = Metric(
    "scer_carbon_grams", "Carbon attributed to requests, gCO2e, final figures", ("model", "upstream", "part")
)
REQUEST_ENERGY = Metric(
    "scer_request_energy_joules",
    "Energy of one metered request, PUE included, final figure",
    ("model", "upstream"),
)
IDLE = Metric(
    "scer_idle_energy_joules",
    "Measured energy while no request was on the GPU, PUE included (under amortize, part of it is spread "
    "into requests: see scer_idle_spread_joules_total)",
    ("upstream",),
)
IDLE_SPREAD = Metric(
    "scer_idle_spread_joules",
    "Idle energy spread into requests' energy (amortize), PUE included",
    ("upstream",),
)
MEASURED = Metric(
    "scer_measured_energy_joules",
    "Energy the upstream's meter counted (its counter's increments), before PUE",
    ("upstream",),
)
IDLE_BALANCE = Metric(
    "scer_idle_balance_joules",
    "Idle energy waiting to be spread over requests (amortize), PUE included",
    ("upstream",),
)
UNSETTLED_REQUESTS = Metric(
    "scer_unsettled_requests",
    "Finished requests whose figure waits for the meter's next reading",
    ("upstream",),
)
UNSETTLED_ENERGY = Metric(
    "scer_unsettled_energy_joules",
    "Response-time energy of the unsettled requests, PUE included (not yet in the counters)",
    ("upstream",),
)
HEALTHY = Metric("scer_meter_healthy", "1 when the upstream's meter answers", ("upstream",))
GRID = Metric(
    "scer_grid_intensity_grams_per_kwh",
    "Grid carbon intensity applied to requests now, gCO2e/kWh",
    ("source",),
)
BUILD = Metric("scer_build_info", "The scer-proxy version serving these metrics (value 1)", ("version",))

COUNTERS = (REQUESTS, TOKENS, ENERGY, CARBON)  # per model: the ones ``report --prometheus`` sums

PROMPT, COMPLETION = "prompt", "completion"  # values of TOKENS' kind
OPERATIONAL, EMBODIED = "operational", "embodied"  # values of CARBON's part
NO_ENERGY = "none"  # ENERGY's source for records without an energy figure (older proxies exported it)
OTHER_MODEL = "other"  # the model label of models beyond ``metrics.max_models``

# Energy per request, in joules: half-decades (1, 3, 10, ...) from an embedding's tenth of a joule to a
# long generation on a multi-GPU server.
ENERGY_BUCKETS_J: tuple[float, ...] = (0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000, 3000, 10_000, 30_000, 100_000)

DEFAULT_MAX_UNSETTLED = 100_000  # records tracked in the unsettled gauges; the oldest dropped beyond

_GLOB = frozenset("*?[")

SeriesKey = tuple[str, ...]  # the label values, in the metric's label order


def literal_models(patterns: Iterable[str]) -> frozenset[str]:
    """The model names a configuration lists literally (patterns without glob characters)."""
    return frozenset(p for p in patterns if not _GLOB & set(p))


def is_final(record: Record) -> bool:
    """Whether a finished record's figure will not change: settled, or without an energy figure."""
    return record.status != "running" and (record.settled or record.energy_j is None)


@dataclass(slots=True)
class Histogram:
    """One histogram series: counts per bucket (not cumulative), their sum and count."""

    counts: list[int]
    sum: float = 0.0
    count: int = 0

    def observe(self, value: float, bounds: tuple[float, ...]) -> None:
        self.counts[bisect.bisect_left(bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[int]:
        """Counts at or below each bound, +Inf last (what Prometheus's ``le`` buckets show)."""
        out, running = [], 0
        for c in self.counts:
            running += c
            out.append(running)
        return out


@dataclass(frozen=True)
class Snapshot:
    """The counters at one instant, copied on the event loop for rendering on a read thread."""

    counters: dict[Metric, dict[SeriesKey, float]]
    created: dict[tuple[str, SeriesKey], float]
    histograms: dict[SeriesKey, Histogram]
    unsettled: dict[str, tuple[int, float]]  # upstream -> (requests, energy_j)
    bounds: tuple[float, ...]


@dataclass
class Counters:
    """The proxy's counters, fed by every record the ledger is given (``observe``), on the event loop.

    Model labels are bounded: the ``configured`` models (listed literally in the configuration) and the
    first ``max_models`` others seen keep their own label; any other model is counted as ``other``. The
    ledger keeps every real name; only the metrics fold them.
    """

    configured: frozenset[str] = frozenset()
    max_models: int = 100
    bounds: tuple[float, ...] = ENERGY_BUCKETS_J
    max_unsettled: int = DEFAULT_MAX_UNSETTLED
    wall_clock: Callable[[], float] = time.time
    _values: dict[Metric, dict[SeriesKey, float]] = field(default_factory=dict)
    _created: dict[tuple[str, SeriesKey], float] = field(default_factory=dict)
    _histograms: dict[SeriesKey, Histogram] = field(default_factory=dict)
    _admitted: set[str] = field(default_factory=set)
    _unsettled: dict[str, tuple[str, float]] = field(default_factory=dict)  # request id -> (upstream, J)

    def model_label(self, model: str) -> str:
        """``model``'s label in the metrics: its own name, or ``other`` beyond the cap."""
        if model in self.configured or model in self._admitted:
            return model
        if len(self._admitted) < self.max_models:
            self._admitted.add(model)
            return model
        return OTHER_MODEL

    def observe(self, record: Record) -> None:
        """A record given to the ledger: counted once its figure is final, else held as unsettled."""
        if record.status == "running":
            return
        rid = record.request_id
        if not is_final(record):
            self._unsettled.pop(rid, None)  # a newer response-time figure goes to the end
            self._unsettled[rid] = (record.upstream, record.energy_j or 0.0)
            if len(self._unsettled) > self.max_unsettled:
                del self._unsettled[next(iter(self._unsettled))]
            return
        self._unsettled.pop(rid, None)
        model, upstream = self.model_label(record.model), record.upstream
        self._add(REQUESTS, (model, upstream, record.status), 1.0)
        self._add(TOKENS, (model, upstream, PROMPT), float(record.prompt_tokens))
        self._add(TOKENS, (model, upstream, COMPLETION), float(record.completion_tokens))
        if record.energy_j is None:
            return
        self._add(ENERGY, (model, upstream, record.energy_source), max(0.0, record.energy_j))
        self._add(CARBON, (model, upstream, OPERATIONAL), max(0.0, record.carbon_operational_g or 0.0))
        self._add(CARBON, (model, upstream, EMBODIED), max(0.0, record.carbon_embodied_g or 0.0))
        key = (model, upstream)
        histogram = self._histograms.get(key)
        if histogram is None:
            histogram = self._histograms[key] = Histogram([0] * (len(self.bounds) + 1))
        histogram.observe(max(0.0, record.energy_j), self.bounds)

    def _add(self, metric: Metric, key: SeriesKey, amount: float) -> None:
        series = self._values.get(metric)
        if series is None:
            series = self._values[metric] = {}
        if key not in series:
            series[key] = 0.0
            self._created[(metric.name, key)] = self.wall_clock()
        series[key] += amount

    def value(self, metric: Metric, *labels: str) -> float:
        """One counter's value (0 when the series does not exist)."""
        return self._values.get(metric, {}).get(tuple(labels), 0.0)

    def snapshot(self) -> Snapshot:
        """A copy to render off the loop (a few thousand entries at most: the labels are bounded)."""
        unsettled: dict[str, tuple[int, float]] = {}
        for upstream, energy_j in self._unsettled.values():
            n, j = unsettled.get(upstream, (0, 0.0))
            unsettled[upstream] = (n + 1, j + energy_j)
        return Snapshot(
            counters={m: dict(s) for m, s in self._values.items()},
            created=dict(self._created),
            histograms={k: Histogram(list(h.counts), h.sum, h.count) for k, h in self._histograms.items()},
            unsettled=unsettled,
            bounds=self.bounds,
        )
