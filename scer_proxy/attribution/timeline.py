"""Timeline attribution of measured energy to requests under continuous batching (pure, no I/O).

Each upstream has one :class:`Timeline`. The proxy reports what it sees of each request (its start,
each streamed token as it passes, its end with the token counts) and the meter reports cumulative
joules at monotonic times. Every meter interval ``[t0, t1]`` with energy ``dE`` is split among the
requests active in it:

- A decode step produces one token for every sequence in the batch and its energy belongs equally
  to them, so within an interval decode energy is split by **decode tokens**: the tokens a stream
  was seen to receive in the interval, or for a non-streamed request (whose tokens are not seen) its
  decode time in the interval times the per-sequence token rate the streams show.
- Prefill is a burst proportional to the prompt: each request's prompt tokens are credited to the
  interval(s) of its prefill window (from its start until its first token; for a non-streamed
  request, the prompt over the observed prefill rate).
- ``prefill_weight`` is the cost of a prompt token in decode-token equivalents. A number fixes it;
  ``"auto"`` calibrates it from the data: interval energy is regressed, by non-negative least squares
  over a sliding window of intervals, on prompt tokens, decode tokens, busy seconds and idle seconds;
  the prompt-token coefficient (joules per prompt token) gives the prefill part of each interval, and
  the rest of the busy energy goes to the decode tokens.

The parts always add up to the whole: for every interval, attributed + idle + carried == dE
(conservation, asserted in the tests on every interval).

Time with no active request is idle. ``idle = "amortize"`` carries idle energy (and idle hardware
time) to the requests of the next busy interval in proportion to their share, so totals include all
the energy of the reserved hardware (SCI 1.1); ``idle = "separate"`` reports it apart. Inside a busy
interval the uncovered time is idle at the idle power learned from fully idle intervals.

Settling: a request's figure is final once a reading at or after its end has been applied. Before
that, :meth:`Timeline.estimate` gives the settled part plus the tail since the last reading, split
the same way at the latest power.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from scer_proxy.attribution.fitting import solve_linear

DEFAULT_PREFILL_WEIGHT = 0.1
"""Decode-token equivalents per prompt token, used until ``auto`` has calibrated (and as the prior).

ML.ENERGY v3 (Llama-3.1-8B on one H100, vLLM): a decode token costs 0.1 to 0.45 J at batch 8 to 64,
while prefill runs near 30,000 tokens/s at about 650 W, roughly 0.02 J a token: about a tenth.
"""
MIN_CALIBRATION_INTERVALS = 6
FIRST_RATE_MIN_TOKENS = 16  # tokens a non-streamed request needs for its rate to replace the prior


@dataclass(slots=True)
class _Request:
    rid: str
    start_s: float
    prompt_tokens: int
    stream: bool = True
    first_token_s: float | None = None
    end_s: float | None = None
    completion_tokens: int = 0
    tokens_since_reading: int = 0
    prefill_lo: float = 0.0
    prefill_hi: float = 0.0
    pinned: bool = False  # the prefill window is known (first token seen, or the request ended)
    decode_from: float = 0.0  # decoding starts after the whole block of prefills this one was part of
    prefill_credited: float = 0.0
    decode_units: float = 0.0
    prefill_j: float = 0.0
    decode_j: float = 0.0
    hw_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Share:
    """Energy and hardware time attributed to one request (so far, or final when ``settled``)."""

    rid: str
    energy_j: float
    prefill_j: float
    decode_j: float
    hw_s: float
    settled: bool


@dataclass(frozen=True)
class IntervalResult:
    """What one applied meter interval did: energy in, to requests, to idle, and carried.

    ``carried_j`` is idle energy deferred to later requests under ``amortize`` (positive), or released
    from earlier idle intervals to this one's requests (negative); energy = attributed + idle + carried.
    """

    t0_s: float
    t1_s: float
    energy_j: float
    attributed_j: float
    idle_j: float
    carried_j: float
    settled: tuple[Share, ...] = ()


@dataclass
class _Interval:
    """A meter interval waiting to be split, with the stream tokens each request received in it."""

    t0_s: float
    t1_s: float
    energy_j: float
    tokens: dict[str, int]


@dataclass
class _Split:
    """How one interval's energy divides: per request (prefill J, decode J, hardware s) and idle."""

    parts: dict[str, tuple[float, float, float]]
    decode: dict[str, float]
    credits: dict[str, float]
    idle_j: float
    prefill_tokens: float
    decode_tokens: float
    busy_s: float
    steps: float | None  # decode steps in the interval, as the streams decoding all through it show
    rate: float  # decode tokens a second per sequence, the rate non-streams are counted at
    rate_seen: bool  # the streams showed it (else it is the rate learned from requests that ended)


class Calibration:
    """Non-negative least squares of interval energy on (prompt tokens, decode steps, decode tokens, idle s).

    The model: a prompt token costs a fixed energy (the prefill coefficient, joules per prompt token); a
    decode step costs ``c0 + c1 x batch`` (so ``c0`` per step and ``c1`` per decode token, which fits
    the ML.ENERGY step energies of a batch from 8 to 128 within a few percent); idle time costs the idle
    power. Steps are counted by the streams that decode all through an interval (one token a step).

    Sufficient statistics with exponential forgetting (about ``window`` intervals), solved exactly for
    four unknowns by trying every subset of free coefficients (Lawson-Hanson's answer, by enumeration).
    """

    names = ("prefill_j_per_token", "step_j", "decode_j_per_token", "idle_w")

    def __init__(self, window: int = 512) -> None:
        self.decay = 1.0 - 1.0 / window
        self.xtx = [[0.0] * 4 for _ in range(4)]
        self.xty = [0.0] * 4
        self.intervals_with_prefill = 0
        self._solution: list[float] | None = None
        self._support: tuple[int, ...] = (0, 1, 2, 3)  # the coefficients free in the last solution

    def add(self, x: tuple[float, float, float, float], y: float) -> None:
        d = self.decay
        for i in range(4):
            self.xty[i] = self.xty[i] * d + x[i] * y
            row = self.xtx[i]
            for j in range(4):
                row[j] = row[j] * d + x[i] * x[j]
        if x[0] > 0:
            self.intervals_with_prefill += 1
        self._solution = None

    def solve(self) -> list[float] | None:
        if self.intervals_with_prefill < MIN_CALIBRATION_INTERVALS:
            return None
        if self._solution is None:
            # It runs at every meter reading, on the event loop, and the statistics move little from one
            # interval to the next: the last solution's free coefficients are tried first, and kept when
            # they pass the optimality test (one solve of at most 4 x 4 instead of fifteen).
            solution = self._on_support(self._support)
            if solution is None:
                solution = self._by_enumeration()
            self._solution = solution
            if solution is not None:
                self._support = tuple(i for i, c in enumerate(solution) if c > 0)
        return self._solution

    def _on_support(self, subset: tuple[int, ...]) -> list[float] | None:
        """The least squares with only ``subset`` free, when it is the non-negative optimum (the KKT
        conditions: no free coefficient below zero, and no fixed one whose increase would lower the
        residual); else None."""
        full = self._feasible(subset) if subset else None
        if full is None:
            return None
        for j in range(4):
            if j not in subset:
                # Half the gradient of the residual along coefficient j: X'X b - X'y.
                gradient = sum(self.xtx[j][k] * full[k] for k in range(4)) - self.xty[j]
                if gradient < 0:
                    return None
        return full

    def _by_enumeration(self) -> list[float] | None:
        """The non-negative least squares by trying every subset of free coefficients."""
        best: tuple[float, list[float]] | None = None
        for size in range(1, 5):
            for subset in itertools.combinations(range(4), size):
                full = self._feasible(subset)
                if full is None:
                    continue
                # Residual sum of squares up to the constant y'y: b'X'Xb - 2 b'X'y.
                quad = sum(full[i] * self.xtx[i][j] * full[j] for i in range(4) for j in range(4))
                rss = quad - 2 * sum(full[i] * self.xty[i] for i in range(4))
                if best is None or rss < best[0]:
                    best = (rss, full)
        return best[1] if best is not None else None

    def _feasible(self, subset: tuple[int, ...]) -> list[float] | None:
        """The least squares with only ``subset`` free, as all four coefficients, when none is negative."""
        coef = solve_linear([[self.xtx[i][j] for j in subset] for i in subset], [self.xty[i] for i in subset])
        if coef is None or any(c < 0 for c in coef):
            return None
        full = [0.0] * 4
        for i, c in zip(subset, coef, strict=True):
            full[i] = c
        return full


@dataclass
class Timeline:
    """The attribution timeline of one upstream (its GPUs and the requests it serves).

    ``prefill_weight``: decode-token equivalents per prompt token, or None for ``auto``.
    ``max_defer_s``: how long an interval may wait for the first tokens that place the prefills in it.
    """

    prefill_weight: float | None = None
    idle: str = "amortize"
    max_defer_s: float = 2.0
    token_interval_s: float = 0.02  # a prior, until requests that show the rate have ended
    token_interval_learned: bool = False  # a non-stream of FIRST_RATE_MIN_TOKENS replaced the prior
    prefill_tokens_per_s: float = 10_000.0
    idle_power_w: float | None = None
    last_t_s: float | None = None
    split_until_s: float | None = None  # the end of the last interval split (later ones may wait)
    last_energy_j: float | None = None
    last_power_w: float | None = None
    idle_j: float = 0.0
    pending_idle_j: float = 0.0
    pending_idle_s: float = 0.0
    measured_j: float = 0.0
    j_per_decode_token: float | None = None
    decode_rate_per_s: float = 0.0  # the per-sequence rate of the split that set j_per_decode_token
    decode_rate_seen: bool = False  # ... and whether streams showed it
    j_per_prompt_token: float = 0.0
    busy_power_w: float | None = None
    calibration: Calibration = field(default_factory=Calibration)
    _requests: dict[str, _Request] = field(default_factory=dict)
    _intervals: list[_Interval] = field(default_factory=list)
    _pinned_until_s: float = -math.inf
    _queue_end_s: float = -math.inf

    # -- what the proxy observes -------------------------------------------------------------
    # Prefill runs as a FIFO queue, as servers run it. Until a request's first token is seen, its
    # prefill window is an estimate (after the requests queued before it, at the observed rate). First
    # tokens pin the windows: a request's prefill ended at least one decode step before its first
    # token, and every request queued before it was prefilled before it. Requests whose first tokens
    # arrive together (the server prefilled them all before its next decode step) form one block,
    # prefilled one after the other in proportion to their prompts.
    def start(self, rid: str, t_s: float, prompt_tokens: int, *, stream: bool = True) -> None:
        req = _Request(rid=rid, start_s=t_s, prompt_tokens=max(0, prompt_tokens), stream=stream)
        # Queued after the last unpinned prefill (kept in ``_queue_end_s``): O(1) on the request path.
        req.prefill_lo = max(t_s, self._queue_end_s, self._pinned_until_s)
        req.prefill_hi = req.prefill_lo + req.prompt_tokens / max(self.prefill_tokens_per_s, 1e-9)
        req.decode_from = req.prefill_hi
        self._queue_end_s = req.prefill_hi
        self._requests[rid] = req

    def tokens(self, rid: str, t_s: float, count: int = 1) -> None:
        """A streamed chunk carrying ``count`` tokens passed the proxy at ``t_s``."""
        req = self._requests.get(rid)
        if req is None:
            return
        if req.first_token_s is None:
            req.first_token_s = t_s
        req.tokens_since_reading += count
        req.completion_tokens += count

    def first_token(self, rid: str, t_s: float) -> None:
        self.tokens(rid, t_s, 1)

    def set_prompt(self, rid: str, prompt_tokens: int) -> None:
        """A better prompt count for a request whose prefill is not placed yet."""
        req = self._requests.get(rid)
        if req is not None and not req.pinned and req.prompt_tokens != prompt_tokens:
            req.prompt_tokens = max(0, prompt_tokens)
            self._estimate_windows()

    def finish(self, rid: str, t_s: float, prompt_tokens: int, completion_tokens: int) -> None:
        req = self._requests.get(rid)
        if req is None:
            return
        req.end_s = max(t_s, req.start_s)
        req.prompt_tokens = max(0, prompt_tokens)
        if req.stream and req.first_token_s is not None:
            seen = req.completion_tokens
            if seen > 1 and req.end_s > req.first_token_s:
                interval = (req.end_s - req.first_token_s) / (seen - 1)
                self.token_interval_s += 0.2 * (interval - self.token_interval_s)
        elif not req.stream and completion_tokens > 1 and req.end_s > req.decode_from:
            # Without streams the token rate can only be learned from whole non-streamed requests.
            self._learn_token_interval((req.end_s - req.decode_from) / completion_tokens, completion_tokens)
        req.completion_tokens = max(0, completion_tokens)
        if not req.pinned:
            req.prefill_hi = min(req.prefill_hi, req.end_s)
            req.prefill_lo = min(req.prefill_lo, req.prefill_hi)
            req.decode_from = min(req.decode_from, req.end_s)
            req.pinned = True

    def _learn_token_interval(self, interval_s: float, tokens: int) -> None:
        """A non-streamed request's time per token, averaged in; the first of at least
        ``FIRST_RATE_MIN_TOKENS`` tokens replaces the prior outright. Non-streams are split at this rate
        while no stream shows it, and a server can be ten times faster or slower than the prior.
        (Streams are averaged in only: the first ones to end in an opening burst are short, and this
        interval also groups first tokens; pinning prefills on one short stream widened the tail.)"""
        if not self.token_interval_learned and tokens >= FIRST_RATE_MIN_TOKENS:
            self.token_interval_s, self.token_interval_learned = interval_s, True
        else:
            self.token_interval_s += 0.2 * (interval_s - self.token_interval_s)

    def _queued(self) -> list[_Request]:
        return [r for r in self._requests.values() if not r.pinned]

    def _estimate_windows(self) -> None:
        """Place the unpinned prefills one after the other from the end of the last pinned one."""
        cursor = self._pinned_until_s
        rate = max(self.prefill_tokens_per_s, 1e-9)
        for req in self._queued():
            req.prefill_lo = max(cursor, req.start_s)
            req.prefill_hi = req.prefill_lo + req.prompt_tokens / rate
            req.decode_from = req.prefill_hi
            cursor = req.prefill_hi
        self._queue_end_s = cursor

    def _pin(self) -> None:
        """Pin the prefill windows that the first tokens seen so far determine."""
        queued = self._queued()
        i = 0
        pinned_any = False
        while i < len(queued):
            j = next((k for k in range(i, len(queued)) if queued[k].first_token_s is not None), None)
            if j is None:
                break
            first = queued[j].first_token_s
            assert first is not None
            # First tokens within one decode step (and a few ms of the proxy's own jitter) came together.
            tolerance = max(self.token_interval_s, 0.005)
            # The group: the streams after j whose first tokens came with j's (non-streams in between,
            # whose tokens are not seen, go with them).
            k, m = j, j + 1
            while m < len(queued):
                other_first = queued[m].first_token_s
                if other_first is not None and other_first <= first + tolerance:
                    k = m
                elif queued[m].stream:
                    break
                m += 1
            end = max(first - self.token_interval_s, queued[j].start_s)
            nxt = next((r for r in queued[k + 1 :] if r.stream), None)
            if nxt is not None and nxt.first_token_s is None and nxt.start_s < end:
                break  # the next stream may still show it was prefilled in this same block: wait for it
            block = queued[i : k + 1]
            begin = min(max(self._pinned_until_s, min(r.start_s for r in block)), end)
            prompts = sum(r.prompt_tokens for r in block)
            if end > begin and prompts > 0:
                rate = prompts / (end - begin)
                self.prefill_tokens_per_s += 0.3 * (rate - self.prefill_tokens_per_s)
            scale = (end - begin) / prompts if prompts > 0 else 0.0
            cursor = begin
            for other in block:
                other.prefill_lo = min(max(cursor, other.start_s), end)
                other.prefill_hi = min(other.prefill_lo + other.prompt_tokens * scale, end)
                other.decode_from = end
                other.pinned = True
                cursor = other.prefill_hi
            self._pinned_until_s = end
            pinned_any = True
            i = k + 1
        if pinned_any:
            self._estimate_windows()

    @property
    def active(self) -> int:
        return sum(1 for r in self._requests.values() if r.end_s is None)

    def pending(self) -> int:
        return len(self._requests)

    def calibrated_prefill_j_per_token(self) -> float | None:
        solution = self.calibration.solve() if self.prefill_weight is None else None
        return solution[0] if solution is not None else None

    # -- the split of one interval -----------------------------------------------------------
    def _prefill_tokens(self, req: _Request, t0: float, t1: float, credited: float) -> float:
        """Prompt tokens credited to [t0, t1], never more than the prompt in all."""
        remaining = req.prompt_tokens - credited
        if remaining <= 0:
            return 0.0
        lo, hi = req.prefill_lo, req.prefill_hi
        if hi <= t1 and (req.pinned or req.end_s is not None):
            return remaining  # the prefill is over by t1: whatever is left belongs here
        if hi <= lo:
            return 0.0
        overlap = max(0.0, min(hi, t1) - max(lo, t0))
        return min(remaining, req.prompt_tokens * overlap / (hi - lo))

    def _split(self, iv: _Interval, credited: dict[str, float]) -> _Split:
        t0, t1, energy_j = iv.t0_s, iv.t1_s, iv.energy_j
        dt = t1 - t0
        active = [
            r for r in self._requests.values() if r.start_s <= t1 and (r.end_s is None or r.end_s >= t0)
        ]
        # The per-sequence token rate of this interval, as the streams decoding all through it show.
        seen = [
            iv.tokens.get(r.rid, 0)
            for r in active
            if r.stream
            and r.first_token_s is not None
            and r.first_token_s <= t0
            and (r.end_s is None or r.end_s >= t1)
        ]
        # (Streams that decode through an interval and receive nothing show a pure prefill interval.)
        rate = (sum(seen) / len(seen) / dt) if seen else 1.0 / max(self.token_interval_s, 1e-6)
        prefill: dict[str, float] = {}
        decode: dict[str, float] = {}
        for r in active:
            prefill[r.rid] = self._prefill_tokens(r, t0, t1, credited.get(r.rid, r.prefill_credited))
            if r.stream:
                decode[r.rid] = float(iv.tokens.get(r.rid, 0))
            else:
                end = r.end_s if r.end_s is not None else t1
                decode[r.rid] = max(0.0, min(end, t1) - max(r.decode_from, t0)) * rate
        busy_s = _covered_seconds(
            [(max(r.start_s, t0), min(r.end_s if r.end_s is not None else t1, t1)) for r in active]
        )
        total_p, total_d = sum(prefill.values()), sum(decode.values())
        steps = (sum(seen) / len(seen)) if seen else (0.0 if total_d <= 0 else None)
        if not active or (total_p <= 0 and total_d <= 0 and busy_s <= 0):
            return _Split({}, {}, {}, energy_j, 0.0, 0.0, 0.0, steps, rate, bool(seen))
        uncovered = max(0.0, dt - busy_s)
        idle_j = 0.0
        if uncovered > 0:
            idle_power = self.idle_power_w if self.idle_power_w is not None else energy_j / dt
            idle_j = min(energy_j, idle_power * uncovered)
        busy_j = energy_j - idle_j
        prefill_share: dict[str, float] = {}
        decode_share: dict[str, float] = {}
        j_per_prompt = self.calibrated_prefill_j_per_token()
        if j_per_prompt is not None and total_d > 0:
            prefill_j = min(busy_j, j_per_prompt * total_p)
            for rid, p in prefill.items():
                prefill_share[rid] = prefill_j * p / total_p if total_p > 0 else 0.0
            for rid, d in decode.items():
                decode_share[rid] = (busy_j - prefill_j) * d / total_d
        else:
            weight = self.prefill_weight if self.prefill_weight is not None else DEFAULT_PREFILL_WEIGHT
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
        return _Split(parts, decode, prefill, idle_j, total_p, total_d, busy_s, steps, rate, bool(seen))

    # -- what the meter observes -------------------------------------------------------------
    def reading(self, t_s: float, energy_j: float) -> IntervalResult | None:
        """Apply a cumulative reading; returns what it settled (None for the first reading).

        The interval it closes is split at once when the prefills in it are placed, else when the first
        tokens that place them arrive (at most ``max_defer_s`` later); the result sums the intervals
        split now.
        """
        if self.last_t_s is None or self.last_energy_j is None:
            self.last_t_s, self.last_energy_j = t_s, energy_j
            return None
        t0, t1 = self.last_t_s, t_s
        d_energy = energy_j - self.last_energy_j
        self.last_t_s, self.last_energy_j = t_s, energy_j
        tokens = {r.rid: r.tokens_since_reading for r in self._requests.values() if r.tokens_since_reading}
        for req in self._requests.values():
            req.tokens_since_reading = 0
        if t1 <= t0 or d_energy < 0:
            # A clock that did not move, or a counter that went backwards (driver reload): the interval
            # carries no usable energy. Requests keep what they had; nothing is invented.
            self._intervals.append(_Interval(t0, t1, 0.0, tokens))
        else:
            self.measured_j += d_energy
            self.last_power_w = d_energy / (t1 - t0)
            self._intervals.append(_Interval(t0, t1, d_energy, tokens))
        self._pin()
        total = IntervalResult(t0, t1, 0.0, 0.0, 0.0, 0.0)
        while self._intervals and self._ready(self._intervals[0], t_s):
            iv = self._intervals.pop(0)
            done = self._apply(iv)
            total = IntervalResult(
                total.t0_s,
                total.t1_s,
                total.energy_j + done.energy_j,
                total.attributed_j + done.attributed_j,
                total.idle_j + done.idle_j,
                total.carried_j + done.carried_j,
                total.settled + done.settled,
            )
        return total

    def _ready(self, iv: _Interval, now_s: float) -> bool:
        if now_s - iv.t1_s >= self.max_defer_s:
            return True
        return not any(r.stream and not r.pinned and r.start_s <= iv.t1_s for r in self._requests.values())

    @property
    def deferred_intervals(self) -> int:
        return len(self._intervals)

    def _apply(self, iv: _Interval) -> IntervalResult:
        t0, t1, d_energy = iv.t0_s, iv.t1_s, iv.energy_j
        self.split_until_s = t1
        dt = t1 - t0
        if d_energy <= 0 or dt <= 0:
            return IntervalResult(t0, t1, 0.0, 0.0, 0.0, 0.0, self._settle(t1))
        split = self._split(iv, {})
        for rid, credit in split.credits.items():
            req = self._requests[rid]
            req.prefill_credited += credit
            req.decode_units += split.decode.get(rid, 0.0)
        if split.steps is not None:
            self.calibration.add(
                (split.prefill_tokens, split.steps, split.decode_tokens, dt - split.busy_s), d_energy
            )
        if not split.parts:
            power = d_energy / dt
            self.idle_power_w = (
                power
                if self.idle_power_w is None
                else (self.idle_power_w + 0.2 * (power - self.idle_power_w))
            )
            if self.idle == "amortize":
                self.pending_idle_j += d_energy
                self.pending_idle_s += dt
                return IntervalResult(t0, t1, d_energy, 0.0, 0.0, d_energy, self._settle(t1))
            self.idle_j += d_energy
            return IntervalResult(t0, t1, d_energy, 0.0, d_energy, 0.0, self._settle(t1))

        busy_j = d_energy - split.idle_j
        self._learn_prices(split, busy_j)
        idle_to_idle = 0.0
        extra_j, extra_s = 0.0, 0.0
        if self.idle == "amortize":
            extra_j = split.idle_j + self.pending_idle_j
            extra_s = (dt - split.busy_s) + self.pending_idle_s
            self.pending_idle_j = 0.0
            self.pending_idle_s = 0.0
        else:
            idle_to_idle = split.idle_j
            self.idle_j += split.idle_j
        attributed = 0.0
        for rid, (pj, dj, hw) in split.parts.items():
            req = self._requests[rid]
            fraction = (pj + dj) / busy_j if busy_j > 0 else 1.0 / len(split.parts)
            extra_p = extra_j * fraction * (pj / (pj + dj)) if pj + dj > 0 else 0.0
            req.prefill_j += pj + extra_p
            req.decode_j += dj + extra_j * fraction - extra_p
            req.hw_s += hw + extra_s * fraction
            attributed += pj + dj + extra_j * fraction
        carried = d_energy - attributed - idle_to_idle  # idle carried in earlier, released now (<= 0)
        return IntervalResult(t0, t1, d_energy, attributed, idle_to_idle, carried, self._settle(t1))

    def _learn_prices(self, split: _Split, busy_j: float) -> None:
        """Joules per decode token and per prompt token, and the busy power, of the latest busy split."""
        prefill_j = sum(p for p, _d, _h in split.parts.values())
        decode_j = sum(d for _p, d, _h in split.parts.values())
        if split.decode_tokens > 0:
            self.j_per_decode_token = decode_j / split.decode_tokens
            self.decode_rate_per_s, self.decode_rate_seen = split.rate, split.rate_seen
        if split.prefill_tokens > 0 and prefill_j > 0:
            self.j_per_prompt_token = prefill_j / split.prefill_tokens
        elif self.j_per_decode_token is not None:
            calibrated = self.calibrated_prefill_j_per_token()
            weight = self.prefill_weight if self.prefill_weight is not None else DEFAULT_PREFILL_WEIGHT
            self.j_per_prompt_token = (
                calibrated if calibrated is not None else weight * self.j_per_decode_token
            )
        if split.busy_s > 0:
            self.busy_power_w = busy_j / split.busy_s

    def _settle(self, t_s: float) -> tuple[Share, ...]:
        done = [r for r in self._requests.values() if r.end_s is not None and r.end_s <= t_s]
        for req in done:
            del self._requests[req.rid]
        return tuple(_share(r, settled=True) for r in done)

    # -- figures at response time ------------------------------------------------------------
    def estimate(self, rid: str, now_s: float) -> Share | None:
        """The part already split, plus the rest at the latest prices; O(1), never waits.

        The rest: the prompt tokens not yet credited at the latest joules per prompt token, and the
        tokens not yet split at the latest joules per decode token (the token count less the decode
        tokens already split; for a non-stream while no stream shows the rate, its decode time since
        the last split at the rate the price was set with). Amortized idle energy still waiting is left
        to settlement.
        """
        req = self._requests.get(rid)
        if req is None:
            return None
        prefill_j, decode_j, hw_s = req.prefill_j, req.decode_j, req.hw_s
        if self.j_per_decode_token is not None:
            rest_prompt = max(0.0, req.prompt_tokens - req.prefill_credited)
            if req.stream or self.decode_rate_seen:
                rest_decode = max(0.0, req.completion_tokens - req.decode_units)
            else:
                # No stream shows the rate: the splits counted this request's decode time at the rate
                # learned from requests that ended, so its rest is counted the same way. Time x rate x
                # price is the decode power per sequence whatever the rate, so a learned rate far from
                # this batch's costs nothing here; pricing the token count would miss by that factor.
                # (With streams beside it, the rate is seen, and the count corrects the earlier splits.)
                since = max(
                    req.decode_from, self.split_until_s if self.split_until_s is not None else req.start_s
                )
                end = req.end_s if req.end_s is not None else now_s
                rest_decode = max(0.0, end - since) * self.decode_rate_per_s
            pj = rest_prompt * self.j_per_prompt_token
            dj = rest_decode * self.j_per_decode_token
            prefill_j += pj
            decode_j += dj
            if self.busy_power_w:
                hw_s += (pj + dj) / self.busy_power_w
        elif self.last_power_w is not None:
            # No busy interval split yet (the first requests): the latest power over the request's time,
            # shared with the requests running beside it.
            sharing = sum(
                1
                for r in self._requests.values()
                if r.start_s <= now_s and (r.end_s is None or r.end_s >= req.start_s)
            )
            tail_s = max(0.0, now_s - req.start_s)
            decode_j += self.last_power_w * tail_s / max(1, sharing)
            hw_s += tail_s / max(1, sharing)
        return Share(rid, prefill_j + decode_j, prefill_j, decode_j, hw_s, settled=False)

    def forget(self, rid: str) -> None:
        self._requests.pop(rid, None)


def _share(req: _Request, *, settled: bool) -> Share:
    return Share(req.rid, req.prefill_j + req.decode_j, req.prefill_j, req.decode_j, req.hw_s, settled)


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
