"""Energy meters: one small protocol, one module per source.

A meter reads the cumulative energy of the devices an upstream runs on, in joules, with the monotonic
time of the reading. Every failure is a :class:`MeterError`, translated once at the meter's edge.
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
    source: str  # the energy source label: nvml | dcgm | rapl | simulated | estimate

    async def read(self) -> Reading: ...

    def describe(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...
