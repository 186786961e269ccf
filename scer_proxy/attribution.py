"""Timeline attribution of measured energy to requests under continuous batching (pure, no I/O).

Each upstream has one :class:`Timeline`. The proxy reports what it sees of each request (start, first
token, end, token counts) and the meter reports cumulative joules at monotonic times. Every meter
interval ``[t0, t1]`` with energy ``dE`` is split among the requests active in it, in proportion to

    weight = decode_seconds_in_interval + prefill_weight * prompt_tokens_prefilled_in_interval * step_time_s

(DESIGN.md, "Attribution"): a decode step serves every active sequence equally, and prefill is a burst
proportional to the prompt. The parts always add up to the whole: for every interval,
attributed + idle == dE (conservation, asserted in the tests).

Time with no active request is idle. ``idle = "amortize"`` carries idle energy (and idle hardware
time) to the requests of the next busy interval in proportion to their share, so totals include all
energy of the reserved hardware (SCI 1.1); ``idle = "separate"`` reports it apart. Within a busy
interval, the uncovered part is idle at the idle power learned from fully idle intervals.

Settling: a request's figure is final once a reading at or after its end has been applied. Before
that, :meth:`Timeline.estimate` gives the settled part plus the tail since the last reading, estimated
from the latest power and the request's current share.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_PREFILL_WEIGHT = 0.1
"""Decode-token equivalents per prompt token before calibration.

ML.ENERGY v3 (Llama-3.1-8B on one H100, vLLM): a decode token costs 0.1 to 0.45 J at batch 8 to 64,
while prefill runs near 30,000 tokens/s at about 650 W, roughly 0.02 J a token: about a tenth.
"""


@dataclass
class _Request:
    rid: str
    start_s: float
    prompt_tokens: int
    first_token_s: float | None = None
    end_s: float | None = None
    completion_tokens: int = 0
    prefill_j: float = 0.0
    decode_j: float = 0.0
    hw_s: float = 0.0


@dataclass(frozen=True)
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
class Timeline:
    """The attribution timeline of one upstream (its GPUs and the requests it serves)."""

    prefill_weight: float = DEFAULT_PREFILL_WEIGHT
    idle: str = "amortize"
    step_time_s: float = 0.02
    prefill_tokens_per_s: float = 10_000.0
    idle_power_w: float | None = None
    last_t_s: float | None = None
    last_energy_j: float | None = None
    last_power_w: float | None = None
    idle_j: float = 0.0
    pending_idle_j: float = 0.0
    pending_idle_s: float = 0.0
    measured_j: float = 0.0
    _requests: dict[str, _Request] = field(default_factory=dict)

    # -- what the proxy observes -------------------------------------------------------------
    def start(self, rid: str, t_s: float, prompt_tokens: int) -> None:
        self._requests[rid] = _Request(rid=rid, start_s=t_s, prompt_tokens=max(0, prompt_tokens))

    def first_token(self, rid: str, t_s: float) -> None:
        req = self._requests.get(rid)
        if req is not None and req.first_token_s is None:
            req.first_token_s = t_s

    def finish(self, rid: str, t_s: float, prompt_tokens: int, completion_tokens: int) -> None:
        req = self._requests.get(rid)
        if req is None:
            return
        req.end_s = max(t_s, req.start_s)
        req.prompt_tokens = max(0, prompt_tokens)
        req.completion_tokens = max(0, completion_tokens)
        if req.first_token_s is not None and completion_tokens > 1:
            decode_s = req.end_s - req.first_token_s
            if decode_s > 0:
                self.step_time_s += 0.2 * (decode_s / (completion_tokens - 1) - self.step_time_s)
            prefill_s = req.first_token_s - req.start_s
            if prefill_s > 0 and req.prompt_tokens > 0:
                self.prefill_tokens_per_s += 0.2 * (req.prompt_tokens / prefill_s - self.prefill_tokens_per_s)

    @property
    def active(self) -> int:
        return sum(1 for r in self._requests.values() if r.end_s is None)

    def pending(self) -> int:
        return len(self._requests)

    # -- weights ----------------------------------------------------------------------------
    def _phases(self, req: _Request, now_s: float) -> tuple[float, float, float]:
        """(prefill start, prefill end = decode start, decode end) for a request, as known at now_s."""
        end = req.end_s if req.end_s is not None else now_s
        if req.first_token_s is not None:
            first = min(req.first_token_s, end)
        else:
            first = req.start_s + req.prompt_tokens / max(self.prefill_tokens_per_s, 1e-9)
            first = min(first, end)
        return req.start_s, first, end

    def _weights(self, t0: float, t1: float, now_s: float) -> tuple[dict[str, tuple[float, float]], float]:
        """Per request (prefill weight, decode weight) in [t0, t1], and the busy (covered) seconds."""
        weights: dict[str, tuple[float, float]] = {}
        spans: list[tuple[float, float]] = []
        for req in self._requests.values():
            start, first, end = self._phases(req, now_s)
            if end < t0 or start > t1:
                continue
            lo, hi = max(start, t0), min(end, t1)
            if hi > lo:
                spans.append((lo, hi))
            prefill_w = 0.0
            if first > start:
                overlap = max(0.0, min(first, t1) - max(start, t0))
                prefill_w = self.prefill_weight * req.prompt_tokens * self.step_time_s * overlap / (first - start)
            elif start >= t0 and start <= t1:
                # The prefill was over before it could be seen (an instant first token): count it here.
                prefill_w = self.prefill_weight * req.prompt_tokens * self.step_time_s
            decode_w = max(0.0, min(end, t1) - max(first, t0))
            if prefill_w > 0 or decode_w > 0:
                weights[req.rid] = (prefill_w, decode_w)
        return weights, _covered_seconds(spans)

    # -- what the meter observes -------------------------------------------------------------
    def reading(self, t_s: float, energy_j: float) -> IntervalResult | None:
        """Apply a cumulative reading; returns the interval it closed (None for the first reading)."""
        if self.last_t_s is None or self.last_energy_j is None:
            self.last_t_s, self.last_energy_j = t_s, energy_j
            return None
        t0, t1 = self.last_t_s, t_s
        d_energy = energy_j - self.last_energy_j
        self.last_t_s, self.last_energy_j = t_s, energy_j
        if t1 <= t0 or d_energy < 0:
            # A clock that did not move, or a counter that went backwards (driver reload): the interval
            # carries no usable energy. Requests keep what they had; nothing is invented.
            return IntervalResult(t0, t1, 0.0, 0.0, 0.0, 0.0, self._settle(t1))
        dt = t1 - t0
        self.measured_j += d_energy
        self.last_power_w = d_energy / dt
        weights, busy_s = self._weights(t0, t1, t1)
        total_w = sum(p + d for p, d in weights.values())
        if total_w <= 0:
            self.idle_power_w = self.last_power_w if self.idle_power_w is None else (
                self.idle_power_w + 0.2 * (self.last_power_w - self.idle_power_w)
            )
            if self.idle == "amortize":
                self.pending_idle_j += d_energy
                self.pending_idle_s += dt
                return IntervalResult(t0, t1, d_energy, 0.0, 0.0, d_energy, self._settle(t1))
            self.idle_j += d_energy
            return IntervalResult(t0, t1, d_energy, 0.0, d_energy, 0.0, self._settle(t1))

        uncovered_s = max(0.0, dt - busy_s)
        if uncovered_s > 0:
            idle_power = self.idle_power_w if self.idle_power_w is not None else d_energy / dt
            idle_part = min(d_energy, idle_power * uncovered_s)
        else:
            idle_part = 0.0
        busy_part = d_energy - idle_part
        busy_hw_s = dt - uncovered_s
        idle_to_requests = 0.0
        idle_to_idle = 0.0
        if self.idle == "amortize":
            idle_to_requests = idle_part + self.pending_idle_j
            hw_to_share = busy_hw_s + uncovered_s + self.pending_idle_s
            self.pending_idle_j = 0.0
            self.pending_idle_s = 0.0
        else:
            idle_to_idle = idle_part
            self.idle_j += idle_part
            hw_to_share = busy_hw_s
        to_share = busy_part + idle_to_requests
        attributed = 0.0
        for rid, (prefill_w, decode_w) in weights.items():
            req = self._requests[rid]
            fraction = (prefill_w + decode_w) / total_w
            part = to_share * fraction
            prefill_part = part * prefill_w / (prefill_w + decode_w)
            req.prefill_j += prefill_part
            req.decode_j += part - prefill_part
            req.hw_s += hw_to_share * fraction
            attributed += part
        carried = d_energy - attributed - idle_to_idle  # idle carried in earlier, released now (<= 0)
        return IntervalResult(t0, t1, d_energy, attributed, idle_to_idle, carried, self._settle(t1))

    def _settle(self, t_s: float) -> tuple[Share, ...]:
        done = [r for r in self._requests.values() if r.end_s is not None and r.end_s <= t_s]
        for req in done:
            del self._requests[req.rid]
        return tuple(_share(r, settled=True) for r in done)

    # -- figures at response time ------------------------------------------------------------
    def estimate(self, rid: str, now_s: float) -> Share | None:
        """The settled part plus the tail since the last reading, from the latest power; never waits."""
        req = self._requests.get(rid)
        if req is None:
            return None
        prefill_j, decode_j, hw_s = req.prefill_j, req.decode_j, req.hw_s
        if self.last_t_s is not None and self.last_power_w is not None and now_s > self.last_t_s:
            weights, _busy = self._weights(self.last_t_s, now_s, now_s)
            total_w = sum(p + d for p, d in weights.values())
            mine = weights.get(rid)
            if mine is not None and total_w > 0:
                fraction = (mine[0] + mine[1]) / total_w
                tail_j = self.last_power_w * (now_s - self.last_t_s) * fraction
                if self.idle == "amortize":
                    tail_j += self.pending_idle_j * fraction
                prefill_tail = tail_j * mine[0] / (mine[0] + mine[1])
                prefill_j += prefill_tail
                decode_j += tail_j - prefill_tail
                hw_s += (now_s - self.last_t_s) * fraction
        return Share(rid, prefill_j + decode_j, prefill_j, decode_j, hw_s, settled=False)

    def forget(self, rid: str) -> None:
        self._requests.pop(rid, None)


def _share(req: _Request, *, settled: bool) -> Share:
    return Share(req.rid, req.prefill_j + req.decode_j, req.prefill_j, req.decode_j, req.hw_s, settled)


def _covered_seconds(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [lo, hi] spans."""
    total = 0.0
    current_lo = current_hi = None
    for lo, hi in sorted(spans):
        if current_hi is None or lo > current_hi:
            if current_hi is not None and current_lo is not None:
                total += current_hi - current_lo
            current_lo, current_hi = lo, hi
        else:
            current_hi = max(current_hi, hi)
    if current_hi is not None and current_lo is not None:
        total += current_hi - current_lo
    return total
