"""The stated 90 % bound on the relative error of a request's energy, from what is known of it (pure).

The error of a split figure comes from the model that divides an interval among the requests in it
(where prefills lie, what a prompt token costs beside a decode step), and averages out over the
intervals a request spans. So the bound grows for a request inside one interval (shorter than the
counter's update period), more so the more energy it shared that interval with, for a non-streamed
request whose decode is counted at a rate rather than from its tokens, at response time with the
part still priced rather than measured, and with the proxy's own timing noise (a busy event loop stamps
tokens and ends late) over the request's duration. The coefficients are fitted on the accuracy scenario matrix's
tuning seed (``bench/harness/scenarios.py``) so that at least 90 % of requests of each scenario lie
inside; ``bench/accuracy.py --matrix`` reports the coverage on the report seed.
"""

from __future__ import annotations

import math

FLOOR = 0.007  # the split's error even for a long request alone
PER_INTERVAL = 0.1  # over sqrt(intervals spanned)
SHORT = 0.25  # a request shorter than one interval
SHORT_SHARED = 0.4  # ... that shared it with fifty times its own energy or more
ESTIMATED = 0.1  # the part of the energy counted from a rate, not from tokens
PRICED = 0.7  # the part priced at response time, not yet measured
TIMING = 2.0  # the proxy's timing noise over the request's duration (0 on the replay, which has none)


def uncertainty_rel(
    *,
    energy_j: float,
    context_j: float,
    estimated_j: float,
    priced_j: float,
    intervals: int,
    duration_s: float,
    interval_s: float | None,
    timing_s: float = 0.0,
) -> float:
    """The bound for a request of ``energy_j`` (``priced_j`` of it not measured yet) that spanned
    ``intervals`` meter intervals of about ``interval_s`` over ``duration_s``, inside intervals whose
    energy during its presence was ``context_j``, with ``estimated_j`` counted from a rate."""
    if energy_j <= 0:
        return 1.0
    short = 1.0 if interval_s is None else min(1.0, interval_s / max(duration_s, 1e-6))
    shared = min(50.0, max(context_j, energy_j) / energy_j) / 50.0
    return (
        FLOOR
        + PER_INTERVAL / math.sqrt(max(1, intervals))
        + SHORT * short
        + SHORT_SHARED * short * shared
        + ESTIMATED * min(1.0, estimated_j / energy_j)
        + PRICED * min(1.0, priced_j / energy_j)
        + TIMING * min(1.0, timing_s / max(duration_s, 1e-6))
    )
