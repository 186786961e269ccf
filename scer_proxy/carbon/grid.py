"""Grid carbon intensity: one figure with its source, and the bundled annual table per country.

Table: Ember / Our World in Data (CC BY 4.0), see ``data/CREDITS.md``. What the configuration asks for
(an override, the table's row, a live provider) is resolved in :mod:`scer_proxy.grid.providers`.
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class GridIntensity:
    """One grid carbon-intensity figure, location-based, in gCO2e per kWh, with where it came from.

    ``fetched_at`` (Unix seconds) is set for live figures only: when the proxy received it; the
    table and a static override leave it ``None`` (their age is the data year in ``as_of``).
    ``flags`` carries ``"grid_fallback"`` when a live provider was configured but this figure is the
    table's (no live value yet, the provider failed, or the last live value is too old).
    """

    intensity_g_per_kwh: float
    source: str  # e.g. "static", "table:FRA", "uk-carbon-intensity:actual", "electricity-maps:FR"
    as_of: str  # the data year, or the ISO 8601 time (or interval) the figure applies to
    fetched_at: float | None = None  # Unix seconds when a live provider answered; None otherwise
    flags: tuple[str, ...] = ()

    def age_s(self, now: float) -> float | None:
        """Seconds since a live figure was fetched (``now`` in Unix seconds); ``None`` for table/static."""
        if self.fetched_at is None:
            return None
        return max(0.0, now - self.fetched_at)


@functools.cache
def annual_table() -> dict[str, tuple[float, int, str]]:
    """iso3 -> (gCO2e/kWh, data year, country name)."""
    text = (resources.files("scer_proxy") / "data" / "grid-intensity-annual.csv").read_text(encoding="utf-8")
    return {
        row["iso3"]: (float(row["g_co2e_per_kwh"]), int(row["year"]), row["country"])
        for row in csv.DictReader(io.StringIO(text))
    }
