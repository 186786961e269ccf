"""SCI 1.1 (ISO/IEC 21031:2024) carbon arithmetic for one request (pure, no I/O).

    SCI = (O + M) per R,  O = E x I,  M = TE x TS x RS

- E: energy in kWh = joules / 3.6e6, PUE included (the joules passed here already include it).
- I: location-based grid intensity, gCO2e/kWh.
- M: embodied emissions of the hardware reserved for the request: total embodied emissions of its
  GPUs and their share of the server, times the time share (the request's attributed hardware
  seconds over the hardware's expected lifetime). Using the attributed hardware seconds rather than
  the request's wall-clock duration keeps concurrent requests from each being charged the same
  GPU-second (their hardware seconds add up to the wall-clock time, as their joules add up to the
  measured energy).
- R: the functional unit. For generation, 1,000 output tokens (SCER for LLM: "carbon per 1,000 tokens
  generated"); for embeddings, 1,000 input tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

JOULES_PER_KWH = 3.6e6
SECONDS_PER_YEAR = 365.25 * 86400


@dataclass(frozen=True)
class Embodied:
    """Embodied emissions of the hardware an upstream runs on."""

    gpu_kg: float
    server_kg: float
    gpus_per_server: int
    lifetime_years: float
    gpus_used: int

    @property
    def total_g(self) -> float:
        return (
            self.gpu_kg * self.gpus_used + self.server_kg * self.gpus_used / self.gpus_per_server
        ) * 1000.0

    def grams_for(self, hw_s: float) -> float:
        """Embodied grams for ``hw_s`` seconds of exclusive use of this hardware."""
        return self.total_g * hw_s / (self.lifetime_years * SECONDS_PER_YEAR)


@dataclass(frozen=True)
class Carbon:
    operational_g: float
    embodied_g: float
    sci_g_per_unit: float | None  # per 1,000 functional units; None when there are none

    @property
    def total_g(self) -> float:
        return self.operational_g + self.embodied_g


def energy_with_pue_j(measured_j: float, pue: float) -> float:
    return measured_j * pue


def operational_g(energy_j: float, intensity_g_per_kwh: float) -> float:
    """O = E x I, with E in kWh (PUE already in ``energy_j``)."""
    return energy_j / JOULES_PER_KWH * intensity_g_per_kwh


def sci_per_1k(carbon_g: float, units: int) -> float | None:
    """gCO2e per 1,000 functional units (output tokens, or input tokens for embeddings)."""
    if units <= 0:
        return None
    return carbon_g * 1000.0 / units


def request_carbon(
    *, energy_j: float, hw_s: float, intensity_g_per_kwh: float, embodied: Embodied, units: int
) -> Carbon:
    o = operational_g(energy_j, intensity_g_per_kwh)
    m = embodied.grams_for(hw_s)
    return Carbon(operational_g=o, embodied_g=m, sci_g_per_unit=sci_per_1k(o + m, units))
