"""When the energy in a counter reading was measured, from when the proxy read it (pure).

A counter that updates less often than it is read (DCGM every 100 ms to 1 s, some NVML boards every
100 ms) holds a value taken some time before the read that first shows it: after the last read that
showed the old value, at or before this one. A request that ends inside that window is settled by the
reading only when it ended before the value was taken, and a token's step is counted in the interval
it ran in, so the time matters to within a decode step; the window's middle is off by up to half the
read interval.

Such a counter updates on its own clock at a steady period: its n-th update is at ``phase + n *
period``. Each window brackets one update. Against the first window of a steady run, every later one
bounds the period (to the read interval over the number of updates between them, so ever tighter),
and the recent windows, each shifted back by its number of periods, all hold the phase: the middle of
their overlap (at the period, within those bounds, where they overlap most) times the latest update to
a small part of the read interval once the reads have fallen at several points of the counter's
period. A window whose update the run's period bounds cannot reach, or whose shift leaves the recent
windows no common phase, even allowing ``JITTER_S`` (the counter skipped, restarted or changed its
period), starts a new run from it. A
counter that changes at every read is taken as current.
"""

from __future__ import annotations

import collections

RECENT_UPDATES = 64  # recent windows intersected for the phase
JITTER_S = 0.002  # how far windows may miss each other and still be one steady clock
PERIOD_TRIES = 9  # periods tried across the bounds the run has left


class ValueClock:
    """Times each new counter value from the reads around it."""

    __slots__ = ("_anchor", "_last_changed", "_last_read_s", "_period_hi", "_period_lo", "_recent")

    def __init__(self) -> None:
        self._last_read_s: float | None = None
        self._last_changed = True
        self._anchor: tuple[float, float] | None = None  # the run's first window
        self._period_lo, self._period_hi = 0.0, float("inf")
        # (updates since the anchor, window start, window end) of the recent updates.
        self._recent: collections.deque[tuple[int, float, float]] = collections.deque(maxlen=RECENT_UPDATES)

    def observe(self, read_s: float, changed: bool) -> float | None:
        """A read at ``read_s``; ``changed``: it shows a new value. Returns the time of that value."""
        previous, previous_changed = self._last_read_s, self._last_changed
        self._last_read_s, self._last_changed = read_s, changed
        if not changed:
            return None
        if previous is None or previous_changed or previous >= read_s:
            self._anchor = None
            return read_s
        return self._update(previous, read_s)

    def _start(self, lo: float, hi: float) -> float:
        self._anchor = (lo, hi)
        self._period_lo, self._period_hi = 0.0, float("inf")
        self._recent.clear()
        self._recent.append((0, lo, hi))
        return 0.5 * (lo + hi)

    def _update(self, lo: float, hi: float) -> float:
        """The time of the update known to lie in (lo, hi]."""
        mid = 0.5 * (lo + hi)
        if self._anchor is None:
            return self._start(lo, hi)
        a_lo, a_hi = self._anchor
        k_last, last_lo, last_hi = self._recent[-1]
        if self._period_hi == float("inf"):
            period = mid - 0.5 * (last_lo + last_hi)  # the second window: one period, roughly
        else:
            period = 0.5 * (self._period_lo + self._period_hi)
        if period <= 0:
            return self._start(lo, hi)
        k = k_last + max(1, round((mid - 0.5 * (last_lo + last_hi)) / period))
        # The period between the anchor's update and this one's: (lo - a_hi) / k to (hi - a_lo) / k.
        period_lo = max(self._period_lo, (lo - a_hi - JITTER_S) / k)
        period_hi = min(self._period_hi, (hi - a_lo + JITTER_S) / k)
        if period_lo > period_hi:
            return self._start(lo, hi)
        self._period_lo, self._period_hi = period_lo, period_hi
        self._recent.append((k, lo, hi))
        if len(self._recent) < 3:
            return mid
        best: tuple[float, float, float] | None = None  # (overlap, its middle, period)
        for i in range(PERIOD_TRIES):
            period = period_lo + (period_hi - period_lo) * (i + 0.5) / PERIOD_TRIES
            low = max(w_lo - w_k * period for w_k, w_lo, _ in self._recent)
            high = min(w_hi - w_k * period for w_k, _, w_hi in self._recent)
            if best is None or high - low > best[0]:
                best = (high - low, 0.5 * (low + high), period)
        assert best is not None
        if best[0] < -JITTER_S:
            return self._start(lo, hi)  # the recent windows hold no common phase: a new run
        if best[0] >= 0.5 * (hi - lo):
            return mid  # the run does not pin the phase closer than the window does yet
        return min(hi, max(lo, best[1] + k * best[2]))
