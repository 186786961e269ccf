"""A counter's update period, measured between the changes of its value as it is read.

A counter that moves every *P* seconds and is read every *d* < *P* seconds shows each new value at the
first read after the update: the update happened inside the window since the read before it, and the
window's middle is within d/2 of it, evenly either way. The gap between two such middles is therefore
*P* within d, unbiased; the median of the recent gaps (pooled over the devices, each device timed on
its own) is robust to the odd long one (a missed read, a paused event loop) or short one (a counter
whose update slips). Gaps are taken between changes only, never from the first read, whose instant
is arbitrary. A counter that changes at every read shows gaps of the read interval: its period is at
most that.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Mapping

KEEP_GAPS = 31  # the recent gaps the median is taken over


class ChangeGaps:
    """Feed it every read (:meth:`observe`); :attr:`period_s` is the median gap between changes."""

    __slots__ = ("_changed_mid_s", "_gaps", "_last_read_s", "_last_value")

    def __init__(self, keep: int = KEEP_GAPS) -> None:
        self._gaps: deque[float] = deque(maxlen=keep)
        self._last_value: dict[str, float] = {}
        self._last_read_s: dict[str, float] = {}
        self._changed_mid_s: dict[str, float] = {}

    def observe(self, read_s: float, values: Mapping[str, float]) -> None:
        """One read at ``read_s`` of each device's value (``values``: device -> value)."""
        for device, value in values.items():
            last_read_s = self._last_read_s.get(device)
            changed = last_read_s is not None and value != self._last_value[device]
            if changed and last_read_s is not None and read_s > last_read_s:
                mid_s = 0.5 * (last_read_s + read_s)
                previous_mid_s = self._changed_mid_s.get(device)
                if previous_mid_s is not None and mid_s > previous_mid_s:
                    self._gaps.append(mid_s - previous_mid_s)
                self._changed_mid_s[device] = mid_s
            self._last_value[device] = value
            self._last_read_s[device] = read_s

    @property
    def gaps(self) -> int:
        return len(self._gaps)

    @property
    def period_s(self) -> float | None:
        """The median of the recent gaps between changes; None before two changes of one device."""
        return statistics.median(self._gaps) if self._gaps else None
