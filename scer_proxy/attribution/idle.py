"""Idle energy spread over the requests of a rolling window, in proportion to their active energy (pure).

Under ``idle = "amortize"`` the energy of the reserved hardware while it serves nobody belongs to the
requests it is reserved for (SCI 1.1). It is not piled onto the next request: each settling request
takes ``ratio x its active energy``, where ``ratio`` is the idle energy over the active energy of the
last ``window_s`` seconds (its own active energy counted in), and never more than is waiting. What is
not spread yet is the balance, reported apart, so that attributed + idle balance = the counter.

Idle energy before the first request is in the balance but in no window: it belongs to no traffic.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

BUCKETS = 60  # the window is kept as this many buckets of equal length


@dataclass(slots=True)
class _Bucket:
    start_s: float
    idle_j: float = 0.0
    idle_s: float = 0.0
    active_j: float = 0.0


class IdleSpread:
    """The idle pool of one upstream and the rolling window that prices it."""

    __slots__ = (
        "_buckets",
        "_seen",
        "_width_s",
        "accrued_j",
        "accrued_s",
        "spread_j",
        "spread_s",
        "window_s",
    )

    def __init__(self, window_s: float = 3600.0) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = window_s
        self._width_s = window_s / BUCKETS
        self._buckets: collections.deque[_Bucket] = collections.deque()
        self.accrued_j = 0.0  # all idle energy and time so far ...
        self.accrued_s = 0.0
        self.spread_j = 0.0  # ... and what of it went to requests
        self.spread_s = 0.0
        self._seen = False  # a request has been active

    @property
    def balance_j(self) -> float:
        """Idle energy not spread yet."""
        return max(0.0, self.accrued_j - self.spread_j)

    def add_idle(self, t_s: float, energy_j: float, seconds: float) -> None:
        if energy_j <= 0:
            return
        self.accrued_j += energy_j
        self.accrued_s += max(0.0, seconds)
        if self._seen:
            bucket = self._bucket(t_s)
            bucket.idle_j += energy_j
            bucket.idle_s += max(0.0, seconds)

    def mark_active(self) -> None:
        """A request is on the GPU: idle from now on is in the window."""
        self._seen = True

    def ratio(self, t_s: float) -> float | None:
        """Idle over active energy in the window ending at ``t_s`` (None before any active energy)."""
        self._expire(t_s)
        active = sum(b.active_j for b in self._buckets)
        if active <= 0:
            return None
        return sum(b.idle_j for b in self._buckets) / active

    def share(self, t_s: float, active_j: float) -> tuple[float, float]:
        """A request settling at ``t_s`` with ``active_j``: its idle (joules, seconds), taken from the pool."""
        if active_j <= 0:
            return 0.0, 0.0
        self._seen = True
        self._bucket(t_s).active_j += active_j
        ratio = self.ratio(t_s) or 0.0
        energy_j = min(ratio * active_j, self.balance_j)
        if energy_j <= 0:
            return 0.0, 0.0
        seconds = energy_j * (self.accrued_s / self.accrued_j) if self.accrued_j > 0 else 0.0
        self.spread_j += energy_j
        self.spread_s += seconds
        return energy_j, seconds

    def _bucket(self, t_s: float) -> _Bucket:
        self._expire(t_s)
        buckets = self._buckets
        if not buckets or t_s >= buckets[-1].start_s + self._width_s:
            buckets.append(_Bucket(t_s))
        return buckets[-1]

    def _expire(self, t_s: float) -> None:
        buckets = self._buckets
        while buckets and buckets[0].start_s + self._width_s <= t_s - self.window_s:
            buckets.popleft()
