"""Timeline attribution of measured energy to requests under continuous batching (pure, no I/O).

Each upstream has one :class:`Timeline`. The proxy reports each request's start, each streamed token
as it passes and its end with the token counts; the meter reports cumulative joules at monotonic
times. Every meter interval ``[t0, t1]`` with energy ``dE`` is split among the requests active in it:

- A decode step produces one token for every sequence in the batch, so decode energy is split by
  **decode tokens**: the tokens a stream received in the interval, or for a non-streamed request
  (whose tokens are not seen) its decode time in the interval at the per-sequence rate streams show.
- Prefill is a burst proportional to the prompt: each request's prompt tokens are credited to the
  interval(s) of its prefill window (from its start until its first token; for a non-streamed
  request, the prompt over the observed prefill rate).
- ``prefill_weight`` is the cost of a prompt token in decode-token equivalents. A number fixes it;
  None (``auto``) calibrates joules per prompt token from the data (:mod:`.calibration`), and the
  rest of the busy energy goes to the decode tokens.

For every interval, attributed + idle + carried == dE (conservation).

Time with no active request is idle. ``idle = "amortize"`` puts idle energy in a pool spread over the
requests of a rolling window in proportion to their active energy (:mod:`.idle`); ``idle =
"separate"`` reports it apart. Inside a busy interval the uncovered time is idle at the idle power.

A request's figure is final once a reading at or after its end has been applied. Before that,
:meth:`Timeline.estimate` gives the settled part plus the tail since the last reading at the latest
prices.
"""

from __future__ import annotations

from dataclasses import dataclass

from scer_proxy.attribution.calibration import Calibration
from scer_proxy.attribution.idle import IdleSpread
from scer_proxy.attribution.learned import DEFAULT_PREFILL_WEIGHT, Learned
from scer_proxy.attribution.split import decode_time_held, prefill_seconds, split_interval
from scer_proxy.attribution.state import IntervalState, OpenRequest, PendingInterval
from scer_proxy.attribution.uncertainty import uncertainty_rel


@dataclass(frozen=True, slots=True)
class Share:
    """Energy and hardware time attributed to one request (so far, or final when ``settled``)."""

    rid: str
    energy_j: float
    prefill_j: float
    decode_j: float
    hw_s: float
    settled: bool
    idle_j: float = 0.0  # the amortized idle energy in ``energy_j`` (the rest is prefill + decode)
    uncertainty_rel: float | None = None  # the stated 90 % bound on the relative error of energy_j


@dataclass(frozen=True)
class IntervalResult:
    """What one applied meter interval did: energy in, to requests, to idle, and carried.

    ``carried_j`` is idle energy put in the ``amortize`` pool; energy = attributed + idle + carried.
    """

    t0_s: float
    t1_s: float
    energy_j: float
    attributed_j: float
    idle_j: float
    carried_j: float
    settled: tuple[Share, ...] = ()


ESTIMATE_BY_TIME_MAX = 64  # requests on the timeline beyond which a response-time figure is priced by
# tokens: one pass over them each (about 0.5 us a request); with that many the batch varies little


@dataclass(frozen=True, slots=True)
class TimelineConfig:
    prefill_weight: float | None = None  # decode-token equivalents per prompt token; None: calibrate
    idle: str = "amortize"  # or "separate"
    max_defer_s: float = 2.0  # how long an interval may wait for the first tokens that place its prefills
    max_hold_s: float = 30.0  # ... while no request in it has ended (none is waiting to settle)
    token_interval_s: float = 0.02  # the prior per-sequence time per token, until requests show it
    idle_window_s: float = 3600.0  # ``amortize``: idle energy is spread over this window's requests


class Timeline:
    """The attribution timeline of one upstream (its GPUs and the requests it serves)."""

    __slots__ = ("config", "idle", "learned", "state")

    def __init__(self, config: TimelineConfig | None = None) -> None:
        self.config = config = config if config is not None else TimelineConfig()
        fixed = config.prefill_weight
        self.learned = Learned(
            prefill_weight=DEFAULT_PREFILL_WEIGHT if fixed is None else fixed,
            calibration=Calibration() if fixed is None else None,
            token_interval_s=config.token_interval_s,
        )
        self.state = IntervalState()
        self.idle = IdleSpread(config.idle_window_s)

    # -- what the proxy observes -------------------------------------------------------------
    # Prefill runs as a FIFO queue, as servers run it. Until a request's first token is seen, its
    # prefill window is an estimate (after the requests queued before it, at the observed rate). First
    # tokens pin the windows: a request's prefill ended at least one decode step before its first
    # token, and every request queued before it was prefilled before it. Requests whose first tokens
    # arrive together (the server prefilled them all before its next decode step) form one block,
    # prefilled one after the other in proportion to their prompts.
    def start(self, rid: str, t_s: float, prompt_tokens: int, *, stream: bool = True) -> None:
        state = self.state
        req = OpenRequest(rid=rid, start_s=t_s, prompt_tokens=max(0, prompt_tokens), stream=stream)
        # Queued after the last unpinned prefill: O(1) on the request path.
        req.prefill_lo = max(t_s, state.queue_end_s, state.pinned_until_s)
        req.prefill_hi = req.prefill_lo + req.prompt_tokens / max(self.learned.prefill_tokens_per_s, 1e-9)
        req.decode_from = req.prefill_hi
        state.queue_end_s = req.prefill_hi
        state.requests[rid] = req

    def tokens(self, rid: str, t_s: float, count: int = 1) -> None:
        """A streamed chunk carrying ``count`` tokens passed the proxy at ``t_s``."""
        req = self.state.requests.get(rid)
        if req is None:
            return
        if req.first_token_s is None:
            req.first_token_s = t_s
        elif req.last_token_s is not None and count > 0:
            self.learned.learn_step_gap((t_s - req.last_token_s) / count)
        req.last_token_s = t_s
        self._step_end(t_s)
        req.tokens_since_reading += count
        req.completion_tokens += count

    def _step_end(self, t_s: float) -> None:
        """A decode step ended at ``t_s`` (a streamed token, or a request's last token)."""
        ends = self.state.step_ends_s
        if not ends or t_s > ends[-1] + 0.0005:
            ends.append(t_s)

    def set_prompt(self, rid: str, prompt_tokens: int) -> None:
        """A better prompt count for a request whose prefill is not placed yet."""
        req = self.state.requests.get(rid)
        if req is not None and not req.pinned and req.prompt_tokens != prompt_tokens:
            req.prompt_tokens = max(0, prompt_tokens)
            self._estimate_windows()

    def finish(self, rid: str, t_s: float, prompt_tokens: int, completion_tokens: int) -> None:
        req = self.state.requests.get(rid)
        if req is None:
            return
        req.end_s = max(t_s, req.start_s)
        req.prompt_tokens = max(0, prompt_tokens)
        state, learned = self.state, self.learned
        if completion_tokens > 0:
            self._step_end(req.end_s)  # its last token ended a step
        if not req.pinned and not req.stream and completion_tokens > 0:
            # The end shows where the prefill ended: the decode time of its tokens before it. Placed like
            # a stream's first token, it pins the windows queued before it and teaches the prefill rate,
            # when that decode time is known well enough (short, or at a step requests have shown).
            step_s = learned.decode_step_s()
            decode_s = completion_tokens * step_s
            if completion_tokens <= 2 or (
                learned.decode_step_known and decode_s <= 0.5 * (req.end_s - req.start_s)
            ):
                req.first_token_s = max(req.start_s, req.end_s - decode_s + step_s)
                req.inferred_decode_s = decode_s
        alone = state.last_end_s <= req.start_s and not any(
            r is not req and (r.end_s is None or r.end_s > req.start_s) for r in state.requests.values()
        )
        state.last_end_s = max(state.last_end_s, req.end_s)
        if alone and completion_tokens > 0:
            learned.learn_alone(req.prompt_tokens, completion_tokens, req.end_s - req.start_s)
        if req.stream and req.first_token_s is not None:
            seen = req.completion_tokens
            if seen > 1 and req.end_s > req.first_token_s:
                learned.learn_stream_interval(req.end_s - req.first_token_s, seen - 1)
        elif not req.stream and completion_tokens > 1 and req.end_s > req.decode_from:
            # Without streams the token rate can only be learned from whole non-streamed requests.
            learned.learn_token_interval((req.end_s - req.decode_from) / completion_tokens, completion_tokens)
        req.completion_tokens = max(0, completion_tokens)
        if req.pinned:
            return
        if req.first_token_s is not None:
            self._pin()
        else:
            # No first token (a stream cut before it, a response with no tokens): the prefill, if any,
            # ended by the end at the latest.
            req.prefill_hi = min(req.prefill_hi, req.end_s)
            req.prefill_lo = min(req.prefill_lo, req.prefill_hi)
            req.decode_from = min(req.decode_from, req.end_s)
            req.pinned = True

    def forget(self, rid: str) -> None:
        self.state.requests.pop(rid, None)

    def void(self, rid: str, t_s: float) -> None:
        """``rid`` used no GPU (an error before any token): it leaves the timeline with no energy, and what
        the intervals already split gave it goes back to idle, so the balances still hold."""
        req = self.state.requests.pop(rid, None)
        if req is None:
            return
        if not req.pinned:
            self._estimate_windows()  # the prompt it was queued with is not ahead of the others
        given_j = req.prefill_j + req.decode_j
        if given_j > 0:
            if self.config.idle == "amortize":
                self.idle.add_idle(t_s, given_j, 0.0)
            else:
                self.state.idle_j += given_j

    def _estimate_windows(self) -> None:
        """Place the unpinned prefills one after the other from the end of the last pinned one."""
        state = self.state
        cursor = state.pinned_until_s
        rate = max(self.learned.prefill_tokens_per_s, 1e-9)
        step_s = self.learned.step_s()
        for req in state.queued():
            req.prefill_lo = max(cursor, req.start_s)
            # A decode step that ended within a step of it was running: the prefill waited for its end.
            step_end = state.step_end_after(req.prefill_lo, req.prefill_lo + step_s)
            if step_end is not None and (req.end_s is None or step_end < req.end_s):
                req.prefill_lo = step_end
            req.prefill_hi = req.prefill_lo + req.prompt_tokens / rate
            if req.end_s is not None:  # ended, waiting for the streams that place its block
                req.prefill_hi = min(req.prefill_hi, req.end_s)
                req.prefill_lo = min(req.prefill_lo, req.prefill_hi)
            req.decode_from = req.prefill_hi
            cursor = req.prefill_hi
        self.state.queue_end_s = cursor

    def _pin(self) -> None:
        """Pin the prefill windows that the first tokens seen so far determine."""
        learned, state = self.learned, self.state
        queued = state.queued()
        i = 0
        pinned_any = False
        while i < len(queued):
            j = next((k for k in range(i, len(queued)) if queued[k].first_token_s is not None), None)
            if j is None:
                break
            step_s = learned.step_s()
            j = self._anchor(queued, j, step_s)
            first = queued[j].first_token_s
            assert first is not None
            # First tokens within one decode step (and a few ms of the proxy's own jitter) came together.
            tolerance = max(step_s, 0.005)
            end = max(first - step_s, queued[j].start_s)
            # The block: the requests after j whose first tokens came with j's, and those that arrived
            # before its prefill ended (prefilled, first come first served, before the decode step that
            # gave the first token). A stream of those whose first token is not seen yet may still show
            # where the block ends: wait for it.
            k, m, wait = j, j + 1, False
            while m < len(queued):
                other = queued[m]
                seen = other.first_token_s is not None and not other.inferred_decode_s
                if seen:
                    assert other.first_token_s is not None
                    if other.first_token_s > first + tolerance:
                        break
                elif other.start_s < end:
                    if other.stream:
                        wait = True
                        break
                elif other.first_token_s is None or other.first_token_s > first + tolerance:
                    break
                k = m
                m += 1
            if wait:
                break
            # A non-stream whose prefill, at the learned rate, was over before j arrived was not in j's
            # block: it has been decoding since (its window is kept as estimated).
            block = []
            for other in queued[i : k + 1]:
                if not other.stream and other is not queued[j] and other.prefill_hi <= queued[j].start_s:
                    other.pinned = True
                    other.decode_from = other.prefill_hi
                    state.pinned_until_s = max(state.pinned_until_s, other.prefill_hi)
                else:
                    block.append(other)
            begin = min(max(state.pinned_until_s, min(r.start_s for r in block)), end)
            if any(
                r.pinned and r.decode_from <= begin and (r.end_s is None or r.end_s > begin)
                for r in state.requests.values()
            ):
                # Sequences were decoding: the block's prefill began when the step in progress ended.
                step_end = state.step_end_after(begin, end)
                begin = step_end if step_end is not None else begin
            prompts = sum(r.prompt_tokens for r in block)
            # A first token inferred from a non-stream's end is as good as its decode time: it teaches
            # the rate only when that time is small beside the prefill's.
            inferred_s = queued[j].inferred_decode_s
            if end > begin and prompts > 0 and inferred_s <= 0.5 * (end - begin):
                learned.learn_prefill(prompts, end - begin)
            scale = (end - begin) / prompts if prompts > 0 else 0.0
            cursor = begin
            for other in block:
                other.prefill_lo = min(max(cursor, other.start_s), end)
                other.prefill_hi = min(other.prefill_lo + other.prompt_tokens * scale, end)
                other.decode_from = end
                other.pinned = True
                cursor = other.prefill_hi
            state.pinned_until_s = end
            pinned_any = True
            i = k + 1
        if pinned_any:
            self._estimate_windows()

    @staticmethod
    def _anchor(queued: list[OpenRequest], j: int, step_s: float) -> int:
        """The request whose first token shows where the block ended: ``j``; or, when ``j``'s first token
        is inferred from a non-stream's end (off by what its decode time is off), a stream's first token
        seen later, from a request that arrived before ``j``'s inferred block end (so in that block)."""
        first = queued[j].first_token_s
        if not queued[j].inferred_decode_s or first is None:
            return j
        for m in range(j + 1, len(queued)):
            other = queued[m]
            if other.start_s >= first - step_s:
                break
            if other.first_token_s is not None and not other.inferred_decode_s:
                return m
        return j

    # -- what the meter observes -------------------------------------------------------------
    def reading(self, t_s: float, energy_j: float) -> IntervalResult | None:
        """Apply a cumulative reading; returns what it settled (None for the first reading).

        The interval it closes is split at once when the prefills in it are placed, else when the first
        tokens that place them arrive (at most ``max_defer_s`` later); the result sums the intervals
        split now.
        """
        state = self.state
        if state.last_t_s is None or state.last_energy_j is None:
            state.last_t_s, state.last_energy_j = t_s, energy_j
            return None
        t0, t1 = state.last_t_s, t_s
        d_energy = energy_j - state.last_energy_j
        state.last_t_s, state.last_energy_j = t_s, energy_j
        tokens = {r.rid: r.tokens_since_reading for r in state.requests.values() if r.tokens_since_reading}
        for req in state.requests.values():
            req.tokens_since_reading = 0
        if t1 <= t0 or d_energy < 0:
            # A clock that did not move, or a counter that went backwards (driver reload): the interval
            # carries no usable energy. Requests keep what they had; nothing is invented.
            state.intervals.append(PendingInterval(t0, t1, 0.0, tokens))
        else:
            state.measured_j += d_energy
            state.last_power_w = d_energy / (t1 - t0)
            state.interval_s = (
                t1 - t0 if state.interval_s is None else state.interval_s + 0.1 * (t1 - t0 - state.interval_s)
            )
            state.intervals.append(PendingInterval(t0, t1, d_energy, tokens))
        self._pin()
        total = IntervalResult(t0, t1, 0.0, 0.0, 0.0, 0.0)
        while state.intervals and self._ready(state.intervals[0], t_s):
            done = self._apply(state.intervals.pop(0))
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

    def _ready(self, iv: PendingInterval, now_s: float) -> bool:
        """An interval is split once the prefills in it are placed. While a stream's first token that
        places them is awaited, it waits when no request in it has ended (none waits to settle), up to
        ``max_hold_s``: a queue of long prompts starves the decode for seconds, and an early split would
        price those prefills at a rate no first token has confirmed. A request that ended waits for it
        ``max_defer_s`` at most, and not at all once a placed prefill has shown the rate."""
        requests = self.state.requests.values()
        if not any(r.stream and not r.pinned and r.start_s <= iv.t1_s for r in requests):
            return True
        age_s = now_s - iv.t1_s
        if age_s >= self.config.max_hold_s:
            return True
        if not any(r.end_s is not None and r.start_s <= iv.t1_s for r in requests):
            return False
        return age_s >= self.config.max_defer_s or self.learned.prefill_samples > 0

    def _apply(self, iv: PendingInterval) -> IntervalResult:
        learned, state = self.learned, self.state
        t0, t1, d_energy = iv.t0_s, iv.t1_s, iv.energy_j
        state.split_until_s = t1
        dt = t1 - t0
        if d_energy <= 0 or dt <= 0:
            return IntervalResult(t0, t1, 0.0, 0.0, 0.0, 0.0, self._settle(t1))
        split = split_interval(iv, state.requests.values(), learned)
        for rid, credit in split.credits.items():
            req = state.requests[rid]
            req.prefill_credited += credit
            req.decode_units += split.decode.get(rid, 0.0)
        if split.steps is not None and learned.calibration is not None:
            learned.calibration.add(
                (split.prefill_tokens, split.steps, split.decode_tokens, dt - split.busy_s), d_energy
            )
        amortize = self.config.idle == "amortize"
        if not split.parts:
            learned.learn_idle_power(d_energy / dt)
            if amortize:
                self.idle.add_idle(t1, d_energy, dt)
                return IntervalResult(t0, t1, d_energy, 0.0, 0.0, d_energy, self._settle(t1))
            state.idle_j += d_energy
            return IntervalResult(t0, t1, d_energy, 0.0, d_energy, 0.0, self._settle(t1))

        busy_j = d_energy - split.idle_j
        learned.learn_power(split.busy_s, dt - split.busy_s, d_energy)
        learned.learn_phases(split.prefill_s, split.busy_s - split.prefill_s, busy_j)
        learned.learn_prices(
            prefill_j=sum(p for p, _d, _h in split.parts.values()),
            decode_j=sum(d for _p, d, _h in split.parts.values()),
            prefill_tokens=split.prefill_tokens,
            decode_tokens=split.decode_tokens,
            rate=split.rate,
            rate_seen=split.rate_seen,
            busy_j=busy_j,
            busy_s=split.busy_s,
        )
        self.idle.mark_active()
        idle_to_idle, carried = 0.0, 0.0
        if amortize:
            self.idle.add_idle(t1, split.idle_j, dt - split.busy_s)
            carried = split.idle_j
        else:
            idle_to_idle = split.idle_j
            state.idle_j += split.idle_j
        attributed = 0.0
        for rid, (pj, dj, hw) in split.parts.items():
            req = state.requests[rid]
            req.prefill_j += pj
            req.decode_j += dj
            req.hw_s += hw
            attributed += pj + dj
            inside_s = min(req.end_s if req.end_s is not None else t1, t1) - max(req.start_s, t0)
            req.context_j += busy_j * max(0.0, inside_s) / dt
            req.intervals += 1
            if not req.stream and req.end_s is None:
                req.estimated_j += dj  # decode time at the streams' rate: its tokens are not known yet
        return IntervalResult(t0, t1, d_energy, attributed, idle_to_idle, carried, self._settle(t1))

    def _settle(self, t_s: float) -> tuple[Share, ...]:
        requests = self.state.requests
        done = [r for r in requests.values() if r.end_s is not None and r.end_s <= t_s]
        shares = []
        for req in done:
            del requests[req.rid]
            active_j = req.prefill_j + req.decode_j
            idle_j, idle_s = self.idle.share(t_s, active_j) if self.config.idle == "amortize" else (0.0, 0.0)
            shares.append(
                Share(
                    req.rid,
                    active_j + idle_j,
                    req.prefill_j,
                    req.decode_j,
                    req.hw_s + idle_s,
                    True,
                    idle_j=idle_j,
                    uncertainty_rel=self._uncertainty(req, 0.0),
                )
            )
        return tuple(shares)

    # -- figures at response time ------------------------------------------------------------
    def estimate(self, rid: str, now_s: float) -> Share | None:
        """The part already split, plus the rest at the latest prices; O(1), never waits.

        The rest: the prompt tokens not yet credited at the latest joules per prompt token, and the
        tokens not yet split at the latest joules per decode token (for a non-stream while no stream
        shows the rate, its decode time since the last split at the rate the price was set with).
        Amortized idle energy still waiting is left to settlement.
        """
        learned, state = self.learned, self.state
        req = state.requests.get(rid)
        if req is None:
            return None
        prefill_j, decode_j, hw_s = req.prefill_j, req.decode_j, req.hw_s
        powers = learned.phase_powers_w()
        if powers is not None and len(state.requests) <= ESTIMATE_BY_TIME_MAX:
            # The rest as the split will count it: its decode time held beside the others decoding, at
            # the decode power, and the rest of its prefill window at the prefill power.
            since = state.split_until_s if state.split_until_s is not None else req.start_s
            end = req.end_s if req.end_s is not None else now_s
            held_s = 0.0
            if end > since:
                held_s = decode_time_held(req, state.requests.values(), since, end)
            prefill_s = prefill_seconds(req, since, end)
            pj = powers[0] * prefill_s
            dj = powers[1] * held_s
            prefill_j += pj
            decode_j += dj
            hw_s += prefill_s + held_s
        elif learned.j_per_decode_token is not None:
            rest_prompt = max(0.0, req.prompt_tokens - req.prefill_credited)
            if req.stream or learned.decode_rate_seen:
                rest_decode = max(0.0, req.completion_tokens - req.decode_units)
            else:
                # The splits counted this request's decode time at the learned rate, so its rest is
                # counted the same way: time x rate x price is the decode power per sequence whatever
                # the rate, where pricing the token count would be off by the rate's error.
                since = max(
                    req.decode_from, state.split_until_s if state.split_until_s is not None else req.start_s
                )
                end = req.end_s if req.end_s is not None else now_s
                rest_decode = max(0.0, end - since) * learned.decode_rate_per_s
            pj = rest_prompt * learned.j_per_prompt_token
            dj = rest_decode * learned.j_per_decode_token
            prefill_j += pj
            decode_j += dj
            if learned.busy_power_w:
                hw_s += (pj + dj) / learned.busy_power_w
        elif state.last_power_w is not None:
            # No busy interval split yet: the latest power over the request's time, shared with the
            # requests running beside it.
            sharing = sum(
                1
                for r in state.requests.values()
                if r.start_s <= now_s and (r.end_s is None or r.end_s >= req.start_s)
            )
            tail_s = max(0.0, now_s - req.start_s)
            decode_j += state.last_power_w * tail_s / max(1, sharing)
            hw_s += tail_s / max(1, sharing)
        priced_j = prefill_j + decode_j - req.prefill_j - req.decode_j
        return Share(
            rid,
            prefill_j + decode_j,
            prefill_j,
            decode_j,
            hw_s,
            settled=False,
            uncertainty_rel=self._uncertainty(req, priced_j),
        )

    def _uncertainty(self, req: OpenRequest, priced_j: float) -> float:
        end = req.end_s if req.end_s is not None else self.state.last_t_s or req.start_s
        return uncertainty_rel(
            energy_j=req.prefill_j + req.decode_j + priced_j,
            context_j=req.context_j,
            estimated_j=req.estimated_j,
            priced_j=priced_j,
            intervals=req.intervals,
            duration_s=end - req.start_s,
            interval_s=self.state.interval_s,
            timing_s=self.state.timing_noise_s,
        )

    # -- what callers read -------------------------------------------------------------------
    def started_s(self, rid: str) -> float | None:
        """When the open request ``rid`` started (None once settled or forgotten)."""
        req = self.state.requests.get(rid)
        return req.start_s if req is not None else None

    @property
    def active(self) -> int:
        return sum(1 for r in self.state.requests.values() if r.end_s is None)

    def pending(self) -> int:
        return len(self.state.requests)

    def note_timing(self, late_s: float) -> None:
        """How late a timer fired on the proxy's event loop: the proxy stamps tokens and ends as late, so
        a request's window is off by about as much. Rises fast, falls slowly (an upper running mean)."""
        noise = self.state.timing_noise_s
        late_s = max(0.0, late_s)
        self.state.timing_noise_s = noise + (0.3 if late_s > noise else 0.02) * (late_s - noise)

    @property
    def deferred_intervals(self) -> int:
        return len(self.state.intervals)

    def calibrated_prefill_j_per_token(self) -> float | None:
        return self.learned.calibrated_prefill_j_per_token()

    @property
    def last_t_s(self) -> float | None:
        return self.state.last_t_s

    @property
    def measured_j(self) -> float:
        return self.state.measured_j

    @property
    def idle_j(self) -> float:
        return self.state.idle_j

    @property
    def idle_balance_j(self) -> float:
        """Idle energy waiting to be spread under ``amortize`` (0 under ``separate``)."""
        return self.idle.balance_j
