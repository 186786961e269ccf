"""When the energy in a counter reading was measured, from when the proxy read it (pure).

A counter that updates less often than it is read (DCGM every 100 ms to 1 s, some NVML boards every
100 ms) holds a value taken some time before the read that first shows it: after the last read that
showed the old value, at or before this one. The midpoint of that window halves the worst error and
removes the bias of timing the value at the read; a request that ends inside the window is settled by
the reading only when it ended before the value was taken. A counter that changes at every read is
taken as current.
"""

from __future__ import annotations


class ValueClock:
    """Times each new counter value from the reads around it."""

    __slots__ = ("_last_changed", "_last_read_s")

    def __init__(self) -> None:
        self._last_read_s: float | None = None
        self._last_changed = True

    def observe(self, read_s: float, changed: bool) -> float | None:
        """A read at ``read_s``; ``changed``: it shows a new value. Returns the time of that value."""
        previous, previous_changed = self._last_read_s, self._last_changed
        self._last_read_s, self._last_changed = read_s, changed
        if not changed:
            return None
        if previous is None or previous_changed or previous >= read_s:
            return read_s
        return 0.5 * (previous + read_s)
