"""Energy meters: one small protocol, one module per source; and the estimator, where no meter exists.

A meter reads the cumulative energy of the devices an upstream runs on, in joules, with the monotonic
time of the reading. Every failure is a :class:`MeterError`, translated once at the meter's edge. An
estimator reads nothing: it models each request's energy at its end from its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


class MeterError(RuntimeError):
    """A meter could not produce a reading (unreachable, malformed, device error)."""


@dataclass(frozen=True)
class Reading:
    t_s: float  # monotonic seconds the value stands for (a scrape's: the middle of its round trip)
    energy_j: float  # cumulative joules, summed over the devices
    devices_j: dict[str, float] = field(default_factory=dict)


class Meter(Protocol):
    source: str  # the energy source label: nvml | dcgm | rapl | simulated

    async def read(self) -> Reading: ...

    def describe(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Estimate:
    """One request's modelled energy (final at once), and flags such as an assumed model size."""

    prefill_j: float
    decode_j: float
    hw_s: float
    flags: tuple[str, ...] = ()


class Estimator(Protocol):
    source: str  # the energy source label: estimate

    @property
    def uncertainty_rel(self) -> float: ...

    def estimate(
        self, *, model: str, prompt_tokens: int, completion_tokens: int, concurrency: float, duration_s: float
    ) -> Estimate: ...

    def describe(self) -> dict[str, Any]: ...
