"""The Prometheus metrics of ``GET /metrics``: names, help, labels, and which summed quantity each carries.

One definition for both ends: the proxy's collector (``scer_proxy.web.scer_routes``) exports ledger rows
through ``series``; ``report --prometheus`` (``scer_proxy.summary.promql``) queries the same names and
labels to sum them back into the quantities of ``scer_proxy.carbon.totals``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Metric:
    name: str  # the family name; a counter's samples are ``<name>_total``
    help: str
    labels: tuple[str, ...] = ()

    @property
    def total(self) -> str:
        """The name of a counter's samples, as Prometheus stores and queries them."""
        return f"{self.name}_total"


REQUESTS = Metric("scer_requests", "Metered requests finished", ("model", "status"))
TOKENS = Metric("scer_tokens", "Tokens of metered requests", ("model", "kind"))
ENERGY = Metric("scer_energy_joules", "Energy attributed to requests, PUE included", ("model", "source"))
CARBON = Metric("scer_carbon_grams", "Carbon attributed to requests, gCO2e", ("model", "part"))
IDLE = Metric("scer_idle_energy_joules", "Measured energy not attributed to any request")
IDLE_BALANCE = Metric(
    "scer_idle_balance_joules", "Idle energy waiting to be spread over requests (amortize), PUE included"
)
HEALTHY = Metric("scer_meter_healthy", "1 when the upstream's meter answers", ("upstream",))
COUNTERS = (REQUESTS, TOKENS, ENERGY, CARBON)

PROMPT, COMPLETION = "prompt", "completion"  # values of TOKENS' kind
OPERATIONAL, EMBODIED = "operational", "embodied"  # values of CARBON's part
NO_ENERGY = "none"  # ENERGY's source for records without an energy figure


def series(row: Mapping[str, Any]) -> list[tuple[Metric, tuple[str, str], float]]:
    """The counter samples a ledger row (sums per model x status x energy source) adds to: the counter,
    its label values and the row's summed quantity."""
    model = row["model"]
    return [
        (REQUESTS, (model, row["status"]), float(row["records"])),
        (TOKENS, (model, PROMPT), float(row["prompt_tokens"])),
        (TOKENS, (model, COMPLETION), float(row["completion_tokens"])),
        (ENERGY, (model, row["energy_source"]), float(row["energy_j"])),
        (CARBON, (model, OPERATIONAL), float(row["carbon_operational_g"])),
        (CARBON, (model, EMBODIED), float(row["carbon_embodied_g"])),
    ]
