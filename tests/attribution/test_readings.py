"""The counter's clock: when a new value was taken, from the reads around it."""

from __future__ import annotations

import random
import statistics

import pytest

from scer_proxy.attribution.readings import ValueClock


def _errors(
    period_s: float, read_every_s: float, jitter_s: float, seconds: float, *, restart_at: float = -1.0
):
    """Read a counter updating every ``period_s`` (its phase jumps at ``restart_at``); returns the timing
    error of each new value after the first 20 s."""
    clock, rng = ValueClock(), random.Random(1)
    t, last, errors = 0.0137, None, []
    while t < seconds:
        phase = 0.037 if t >= restart_at > 0 else 0.0
        n = int((t - phase) / period_s)
        changed = n != last
        value_s = clock.observe(t, changed)
        if changed and value_s is not None and last is not None and t > 20.0:
            errors.append(value_s - (phase + n * period_s))
        last = n
        t += read_every_s + rng.uniform(-jitter_s, jitter_s)
    return errors


@pytest.mark.parametrize("period_s", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("jitter_s", [0.0, 0.001])
def test_a_steady_counter_is_timed_far_closer_than_the_windows_middle(
    period_s: float, jitter_s: float
) -> None:
    """Reads every 25.1 ms against the counter's own clock: the middle of a window is off by up to
    12.5 ms (about 6 ms at the median); intersecting the windows of a steady run times values to about
    a millisecond, and never outside the window."""
    errors = _errors(period_s, 0.0251, jitter_s, 120.0)
    assert statistics.median(abs(e) for e in errors) < 0.002
    assert max(abs(e) for e in errors) <= 0.0126


def test_a_counter_that_jumps_its_phase_starts_a_new_run() -> None:
    """A restart (the exporter's clock moves by 37 ms): the clock never times a value outside its
    window (25.1 ms) and locks onto the new phase."""
    errors = _errors(0.1, 0.0251, 0.0005, 120.0, restart_at=60.0)
    assert max(abs(e) for e in errors) <= 0.0252
    late = errors[-200:]
    assert statistics.median(abs(e) for e in late) < 0.002


def test_a_counter_that_changes_at_every_read_is_current() -> None:
    clock = ValueClock()
    assert clock.observe(1.0, True) == 1.0
    assert clock.observe(1.1, True) == 1.1
    assert clock.observe(1.2, False) is None
    assert 1.2 < clock.observe(1.3, True) <= 1.3  # type: ignore[operator]
