"""How one meter interval's energy divides among the requests active in it, and idle (pure)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass

from scer_proxy.attribution.learned import Learned
from scer_proxy.attribution.state import OpenRequest, PendingInterval


@dataclass(slots=True)
class Split:
    """One interval's division: per request (prefill J, decode J, hardware s), and idle."""

    parts: dict[str, tuple[float, float, float]]
    decode: dict[str, float]  # decode tokens per request
    credits: dict[str, float]  # prompt tokens credited per request
    idle_j: float
    prefill_tokens: float
    decode_tokens: float
    busy_s: float
    steps: float | None  # decode steps in the interval, as the streams decoding all through it show
    rate: float  # decode tokens a second per sequence, the rate non-streams are counted at
    rate_seen: bool  # the streams showed it (else it is the rate learned from requests that ended)
    prefill_s: float = 0.0  # the prefill windows' time in the interval


def split_interval(iv: PendingInterval, requests: Iterable[OpenRequest], learned: Learned) -> Split:
    t0, t1, energy_j = iv.t0_s, iv.t1_s, iv.energy_j
    dt = t1 - t0
    active = [r for r in requests if r.start_s <= t1 and (r.end_s is None or r.end_s >= t0)]
    # The per-sequence token rate, as the streams decoding all through the interval show it (one that
    # receives nothing shows a pure prefill interval).
    seen = [
        iv.tokens.get(r.rid, 0)
        for r in active
        if r.stream
        and r.first_token_s is not None
        and r.first_token_s <= t0
        and (r.end_s is None or r.end_s >= t1)
    ]
    rate = (sum(seen) / len(seen) / dt) if seen else 1.0 / max(learned.decode_step_s(), 1e-6)
    prefill: dict[str, float] = {}
    decode: dict[str, float] = {}
    prefill_s = sum(prefill_seconds(r, t0, t1) for r in active)  # prefills run one at a time
    if not seen:
        # No stream shows the rate: a prefill holds the GPU, so nothing decodes while one runs.
        rate *= max(0.0, 1.0 - prefill_s / dt)
    for r in active:
        prefill[r.rid] = _prefill_tokens(r, t0, t1)
        if r.stream:
            decode[r.rid] = float(iv.tokens.get(r.rid, 0))
        elif r.end_s is not None:
            # Ended: its token count is known, the rest of it over the rest of its decode time.
            rest = max(0.0, r.completion_tokens - r.decode_units)
            window = r.end_s - max(r.decode_from, t0)
            inside = max(0.0, min(r.end_s, t1) - max(r.decode_from, t0))
            decode[r.rid] = rest if window <= 0 or r.end_s <= t1 else rest * inside / window
        else:
            decode[r.rid] = max(0.0, t1 - max(r.decode_from, t0)) * rate
    busy_s = _covered_seconds(
        [(max(r.start_s, t0), min(r.end_s if r.end_s is not None else t1, t1)) for r in active]
    )
    total_p, total_d = sum(prefill.values()), sum(decode.values())
    steps = (sum(seen) / len(seen)) if seen else (0.0 if total_d <= 0 else None)
    if not active or (total_p <= 0 and total_d <= 0 and busy_s <= 0):
        return Split({}, {}, {}, energy_j, 0.0, 0.0, 0.0, steps, rate, bool(seen))
    uncovered = max(0.0, dt - busy_s)
    idle_j = 0.0
    if uncovered > 0:
        # Never above the interval's mean power: the busy part draws at least the idle power.
        idle_power = min(learned.idle_power_estimate_w() or math.inf, energy_j / dt)
        idle_j = min(energy_j, idle_power * uncovered)
    busy_j = energy_j - idle_j
    prefill_share: dict[str, float] = {}
    decode_share: dict[str, float] = {}
    held = decode_time_shares(active, t0, t1)
    j_per_prompt = learned.calibrated_prefill_j_per_token()
    if j_per_prompt is not None and learned.busy_power_w and learned.prefill_samples:
        # The fit is trusted while it agrees with the physics within a factor of two: a prompt token
        # holds the GPU for 1 / prefill rate seconds at about the busy power. Prefills misplaced in
        # time bias the fit low (errors in the variables); then the time share is the better rule.
        timed = learned.busy_power_w / max(learned.prefill_tokens_per_s, 1e-9)
        if not 0.5 * timed <= j_per_prompt <= 2.0 * timed:
            j_per_prompt = None
    if j_per_prompt is not None and total_d > 0:
        prefill_j = min(busy_j, j_per_prompt * total_p)
        for rid, p in prefill.items():
            prefill_share[rid] = prefill_j * p / total_p if total_p > 0 else 0.0
        _share_decode(decode_share, busy_j - prefill_j, held, decode)
    elif learned.calibration is not None and total_d > 0 and total_p > 0:
        # Uncalibrated: a prefill holds the GPU alone, so prefill energy is the busy energy over the
        # prefill's share of the busy time (its windows, at the observed prefill rate).
        # The decode steps took time too: at least the most tokens a stream got, at the step time.
        streamed = max((iv.tokens.get(r.rid, 0) for r in active if r.stream), default=0)
        decode_s = max(busy_s - prefill_s, streamed * learned.decode_step_s(), 1e-9)
        # At the power a prefill draws beside a decode step, where the intervals have shown it.
        weighted_s = prefill_s * (learned.prefill_power_ratio() or 1.0)
        prefill_j = busy_j * weighted_s / (weighted_s + decode_s) if prefill_s > 0 else 0.0
        for rid, p in prefill.items():
            prefill_share[rid] = prefill_j * p / total_p
        _share_decode(decode_share, busy_j - prefill_j, held, decode)
    else:
        weight = learned.prefill_weight
        if total_d <= 0:
            weight = 1.0  # nothing decoded: the interval is prefill (or waiting) only
        total_w = weight * total_p + total_d
        if total_w <= 0:
            # Requests were present but neither prefilled nor decoded visibly: share by presence.
            decode = {
                r.rid: max(0.0, min(r.end_s if r.end_s is not None else t1, t1) - max(r.start_s, t0))
                for r in active
            }
            total_w = sum(decode.values())
            weight = 0.0
        for rid in decode:
            prefill_share[rid] = busy_j * weight * prefill[rid] / total_w if total_w > 0 else 0.0
            decode_share[rid] = busy_j * decode[rid] / total_w if total_w > 0 else 0.0
    parts = {}
    for rid in decode:
        pj, dj = prefill_share.get(rid, 0.0), decode_share.get(rid, 0.0)
        hw = (busy_s * (pj + dj) / busy_j) if busy_j > 0 else 0.0
        parts[rid] = (pj, dj, hw)
    return Split(
        parts,
        decode,
        prefill,
        idle_j,
        total_p,
        total_d,
        busy_s,
        steps,
        rate,
        bool(seen),
        min(prefill_s, busy_s),
    )


def _share_decode(
    out: dict[str, float], decode_j: float, held: dict[str, float], decode: dict[str, float]
) -> None:
    """Divide ``decode_j`` by decode time held (a step's energy is shared by its batch), else tokens. A
    stream holding time with no token in the interval still decoded: its step's token came after."""
    weights = {rid: held.get(rid, 0.0) for rid in decode}
    total = sum(weights.values())
    if total <= 0:
        weights, total = decode, sum(decode.values())
    for rid in decode:
        out[rid] = decode_j * weights.get(rid, 0.0) / total if total > 0 else 0.0


def decode_time_shares(active: list[OpenRequest], t0: float, t1: float) -> dict[str, float]:
    """Each request's share of the decode time in [t0, t1]: every instant split equally among those
    decoding then (a decode step runs its whole batch at once), prefill windows excluded (a prefill
    holds the GPU alone). A sweep over the span ends, O(n log n)."""
    spans: dict[str, tuple[float, float]] = {}
    changes: dict[float, list[int]] = {}  # time -> [decoding count change, prefill count change]
    for r in active:
        lo, hi = _decode_span(r, t0, t1)
        if hi > lo:
            spans[r.rid] = (lo, hi)
            changes.setdefault(lo, [0, 0])[0] += 1
            changes.setdefault(hi, [0, 0])[0] -= 1
        plo, phi = _prefill_span(r, t0, t1)
        if phi > plo:
            changes.setdefault(plo, [0, 0])[1] += 1
            changes.setdefault(phi, [0, 0])[1] -= 1
    if not spans:
        return {}
    points = sorted(changes)
    held_at = {points[0]: 0.0}  # the time-share a request decoding since the first point holds
    decoding = prefilling = 0
    held = 0.0
    for a, b in itertools.pairwise(points):
        decoding += changes[a][0]
        prefilling += changes[a][1]
        if decoding > 0 and prefilling <= 0:
            held += (b - a) / decoding
        held_at[b] = held
    return {rid: held_at[hi] - held_at[lo] for rid, (lo, hi) in spans.items()}


def decode_time_held(req: OpenRequest, active: Iterable[OpenRequest], t0: float, t1: float) -> float:
    """``req``'s entry of :func:`decode_time_shares` alone, in one pass over the others (for figures at
    response time, where the whole sweep for every request would cost O(n log n) each)."""
    lo, hi = _decode_span(req, t0, t1)
    if hi <= lo:
        return 0.0
    changes: dict[float, list[int]] = {}
    decoding = prefilling = 0
    for r in active:
        a, b = _decode_span(r, t0, t1)
        if b > a and a < hi and b > lo:
            if a <= lo:
                decoding += 1
            else:
                changes.setdefault(a, [0, 0])[0] += 1
            if b < hi:
                changes.setdefault(b, [0, 0])[0] -= 1
        pa, pb = _prefill_span(r, t0, t1)
        if pb > pa and pa < hi and pb > lo:
            if pa <= lo:
                prefilling += 1
            else:
                changes.setdefault(pa, [0, 0])[1] += 1
            if pb < hi:
                changes.setdefault(pb, [0, 0])[1] -= 1
    held, at = 0.0, lo
    for t in [*sorted(changes), hi]:
        if decoding > 0 and prefilling <= 0:
            held += (t - at) / decoding
        at = t
        if t in changes:
            decoding += changes[t][0]
            prefilling += changes[t][1]
    return held


def _prefill_tokens(req: OpenRequest, t0: float, t1: float) -> float:
    """Prompt tokens credited to [t0, t1], never more than the prompt in all."""
    remaining = req.prompt_tokens - req.prefill_credited
    if remaining <= 0:
        return 0.0
    lo, hi = req.prefill_lo, req.prefill_hi
    if hi <= t1 and (req.pinned or req.end_s is not None):
        return remaining  # the prefill is over by t1: whatever is left belongs here
    if hi <= lo:
        return 0.0
    overlap = max(0.0, min(hi, t1) - max(lo, t0))
    return min(remaining, req.prompt_tokens * overlap / (hi - lo))


def _decode_span(req: OpenRequest, t0: float, t1: float) -> tuple[float, float]:
    """Where ``req`` decodes inside [t0, t1] (empty when the second is not above the first): from the
    end of its prefill block to its end."""
    return max(req.decode_from, t0), min(req.end_s if req.end_s is not None else t1, t1)


def _prefill_span(req: OpenRequest, t0: float, t1: float) -> tuple[float, float]:
    """``req``'s prefill window inside [t0, t1] (empty when the second is not above the first)."""
    return max(req.prefill_lo, t0), min(req.prefill_hi, t1)


def prefill_seconds(req: OpenRequest, t0: float, t1: float) -> float:
    """How long ``req``'s prefill window overlaps [t0, t1]."""
    lo, hi = _prefill_span(req, t0, t1)
    return max(0.0, hi - lo)


def _covered_seconds(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [lo, hi] spans."""
    total = 0.0
    current_lo = current_hi = -math.inf
    for lo, hi in sorted(spans):
        if hi <= lo:
            continue
        if lo > current_hi:
            if current_hi > current_lo:
                total += current_hi - current_lo
            current_lo, current_hi = lo, hi
        else:
            current_hi = max(current_hi, hi)
    if current_hi > current_lo:
        total += current_hi - current_lo
    return total
