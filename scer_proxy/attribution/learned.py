"""What a timeline learns from its readings and requests: token and prefill rates, idle power, prices."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from scer_proxy.attribution.calibration import Calibration
from scer_proxy.attribution.fitting import DecayedFit2

DEFAULT_PREFILL_WEIGHT = 0.1
"""Decode-token equivalents per prompt token while ``auto`` has not calibrated (and as its prior).

ML.ENERGY v3, Llama-3.1-8B on one H100: a decode token costs 0.1 to 0.45 J, a prompt token about 0.02 J.
"""
# A compute-bound prefill draws about as much as a decode step or more (the simulator's 8B profile: 1.4x;
# H100 traces: 1.1 to 2x); a fit outside this range rests on misplaced prefills and is not used.
PREFILL_POWER_RATIO_RANGE = (0.7, 4.0)
PHASE_POWER_OVER_SEEN = 1.5  # a fitted power above this times the highest interval's is not trusted
STEP_GAPS_MIN = 8  # per-stream token gaps before their quartile is taken for the decode step
FIRST_RATE_MIN_TOKENS = 16  # tokens a non-streamed request needs for its rate to replace the prior


@dataclass(slots=True)
class Learned:
    """The timeline's running estimates; each ``learn_*`` folds in one observation."""

    prefill_weight: float = DEFAULT_PREFILL_WEIGHT  # fixed, or the prior while ``calibration`` is unsolved
    calibration: Calibration | None = None  # None: the prefill weight is fixed
    token_interval_s: float = 0.02  # per-sequence seconds per token
    token_interval_learned: bool = False  # a non-stream of FIRST_RATE_MIN_TOKENS replaced the prior
    prefill_tokens_per_s: float = 10_000.0  # the prior until a prefill is seen
    prefill_tokens_seen: float = 0.0  # prompt tokens and seconds of the prefills seen, decayed ...
    prefill_seconds_seen: float = 0.0
    prefill_samples: int = 0  # ... and how many
    token_interval_samples: int = 0
    stream_seconds_seen: float = 0.0  # streams' time from first to last token and gaps, decayed
    stream_gaps_seen: float = 0.0
    step_gaps_s: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=256))
    _step_s: float | None = None  # the cached lower quartile of ``step_gaps_s``
    idle_power_w: float | None = None  # from intervals with no request in them
    idle_samples: int = 0
    # Interval energy on (busy s, idle s): the idle power before an idle interval is seen.
    power_fit: DecayedFit2 = field(default_factory=lambda: DecayedFit2(256))
    # An interval's busy energy on (prefill s, other busy s): a prefill's power beside a decode's.
    phase_fit: DecayedFit2 = field(default_factory=lambda: DecayedFit2(256))
    phase_samples: int = 0
    max_busy_power_w: float = 0.0  # the highest busy power an interval showed
    # A request served alone: its life on (prompt tokens, completion tokens).
    alone_fit: DecayedFit2 = field(default_factory=lambda: DecayedFit2(64))
    alone_samples: int = 0
    j_per_decode_token: float | None = None
    decode_rate_per_s: float = 0.0  # the per-sequence rate of the split that set j_per_decode_token
    decode_rate_seen: bool = False  # ... and whether streams showed it
    j_per_prompt_token: float = 0.0
    busy_power_w: float | None = None

    def calibrated_prefill_j_per_token(self) -> float | None:
        solution = self.calibration.solve() if self.calibration is not None else None
        return solution[0] if solution is not None else None

    def learn_stream_interval(self, seconds: float, intervals: int) -> None:
        """A stream's ``intervals`` gaps between tokens over ``seconds``: the time per token is the ratio
        of the decayed sums (about the last 32 streams), so a stream of two tokens held apart by a long
        prefill weighs as one gap, not as a whole stream."""
        if intervals <= 0 or seconds <= 0:
            return
        decay = 1.0 - 1.0 / 32
        self.stream_seconds_seen = self.stream_seconds_seen * decay + seconds
        self.stream_gaps_seen = self.stream_gaps_seen * decay + intervals
        self.token_interval_s = self.stream_seconds_seen / self.stream_gaps_seen
        self.token_interval_samples += 1

    def learn_step_gap(self, gap_s: float) -> None:
        """The time between two tokens of one stream: a decode step, or more where prefills ran
        between its steps."""
        if gap_s > 0:
            self.step_gaps_s.append(gap_s)
            self._step_s = None

    def step_s(self) -> float:
        """How long one decode step runs: the lower quartile of recent per-stream token gaps (a gap with
        no prefill in it is one step), else the time a token takes. The time per token is longer (the
        prefills between steps are in it), so a first token placed a token's time after its prefill
        would place the prefill too early."""
        if len(self.step_gaps_s) < STEP_GAPS_MIN:
            return self.decode_step_s()
        if self._step_s is None:
            ordered = sorted(self.step_gaps_s)
            self._step_s = ordered[len(ordered) // 4]
        return self._step_s

    def learn_token_interval(self, interval_s: float, tokens: int) -> None:
        """A non-streamed request's time per token, averaged in; the first of at least
        ``FIRST_RATE_MIN_TOKENS`` tokens replaces the prior outright, since non-streams are split at this
        rate while no stream shows it and a server can be ten times off the prior. Streams only average
        in: the first to end are short ones, and this interval also groups first tokens."""
        if not self.token_interval_learned and tokens >= FIRST_RATE_MIN_TOKENS:
            self.token_interval_s, self.token_interval_learned = interval_s, True
        else:
            self.token_interval_s += 0.2 * (interval_s - self.token_interval_s)
        self.token_interval_samples += 1

    def learn_prefill(self, prompt_tokens: float, seconds: float) -> None:
        """A prefill (or a block of them) of ``prompt_tokens`` that took ``seconds``.

        The rate is the ratio of the decayed sums (about the last 32 prefills), so a long prompt weighs
        as much as its tokens and a short one, whose time is mostly the wait for a decode step to end,
        weighs little; the first prefill replaces the prior outright.
        """
        if prompt_tokens <= 0 or seconds <= 0:
            return
        decay = 1.0 - 1.0 / 32
        self.prefill_tokens_seen = self.prefill_tokens_seen * decay + prompt_tokens
        self.prefill_seconds_seen = self.prefill_seconds_seen * decay + seconds
        self.prefill_tokens_per_s = self.prefill_tokens_seen / self.prefill_seconds_seen
        self.prefill_samples += 1

    def describe(self) -> dict[str, float | int | None]:
        """The learned values and how many observations each rests on (for ``/scer/health``)."""
        return {
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "prefill_samples": self.prefill_samples,
            "token_interval_ms": self.token_interval_s * 1000.0,
            "token_interval_samples": self.token_interval_samples,
            "decode_step_ms": self.decode_step_s() * 1000.0,
            "step_ms": self.step_s() * 1000.0,
            "step_samples": len(self.step_gaps_s),
            "prefill_power_w": None if (powers := self.phase_powers_w()) is None else powers[0],
            "decode_power_w": None if powers is None else powers[1],
            "power_samples": self.phase_samples,
            "alone_samples": self.alone_samples,
            "idle_power_w": self.idle_power_estimate_w(),
            "idle_samples": self.idle_samples,
            "busy_power_w": self.busy_power_w,
            "j_per_decode_token": self.j_per_decode_token,
            "j_per_prompt_token": self.j_per_prompt_token,
            "prefill_j_per_token_calibrated": self.calibrated_prefill_j_per_token(),
        }

    def learn_idle_power(self, power_w: float) -> None:
        self.idle_power_w = (
            power_w
            if self.idle_power_w is None
            else (self.idle_power_w + 0.2 * (power_w - self.idle_power_w))
        )
        self.idle_samples += 1

    def learn_power(self, busy_s: float, idle_s: float, energy_j: float) -> None:
        """A busy interval's energy against its busy and uncovered seconds."""
        self.power_fit.add(busy_s, idle_s, energy_j)

    def learn_phases(self, prefill_s: float, other_s: float, busy_j: float) -> None:
        """A busy interval's energy (idle taken out) against its prefill seconds and the rest."""
        self.phase_fit.add(prefill_s, other_s, busy_j)
        self.phase_samples += 1
        if prefill_s + other_s > 0:
            self.max_busy_power_w = max(self.max_busy_power_w, busy_j / (prefill_s + other_s))

    def phase_powers_w(self) -> tuple[float, float] | None:
        """(prefill, decode) power as the intervals show them; None while they cannot tell (too few
        intervals with and without prefills) or the fit is outside what a GPU does."""
        coef = self.phase_fit.solve()
        if coef is None or coef[0] <= 0 or coef[1] <= 0:
            return None
        if max(coef) > PHASE_POWER_OVER_SEEN * self.max_busy_power_w:
            return None  # extrapolated far past any interval seen: too few intervals yet
        ratio = coef[0] / coef[1]
        if not PREFILL_POWER_RATIO_RANGE[0] <= ratio <= PREFILL_POWER_RATIO_RANGE[1]:
            return None
        return coef[0], coef[1]

    def prefill_power_ratio(self) -> float | None:
        """A prefill's power over a decode's (see :meth:`phase_powers_w`)."""
        powers = self.phase_powers_w()
        return None if powers is None else powers[0] / powers[1]

    def learn_alone(self, prompt_tokens: int, completion_tokens: int, life_s: float) -> None:
        """A request that had the GPU to itself from its start to its end."""
        self.alone_fit.add(float(prompt_tokens), float(completion_tokens), life_s)
        self.alone_samples += 1

    @property
    def decode_step_known(self) -> bool:
        """Whether requests have shown the decode step (else it is the prior)."""
        return bool(self.token_interval_samples or self.token_interval_learned or self.alone_samples >= 2)

    def decode_step_s(self) -> float:
        """The time a token of a sequence takes: as streams show it, else as requests served alone show
        it (their life less their prompt at the prefill rate, over their tokens), else the prior."""
        if self.token_interval_samples or self.alone_samples < 2:
            return self.token_interval_s
        coef = self.alone_fit.solve()
        if coef is not None and coef[0] >= 0 and coef[1] > 0:
            return coef[1]
        # All alike (one token each, say): the time beyond the prefill, per token.
        xtx, xty = self.alone_fit.xtx, self.alone_fit.xty
        beyond = xty[1] - xtx[1] / max(self.prefill_tokens_per_s, 1e-9)
        return beyond / xtx[2] if beyond > 0 and xtx[2] > 0 else self.token_interval_s

    def idle_power_estimate_w(self) -> float | None:
        """The idle power: measured on idle intervals, else fitted on busy ones with idle time in them."""
        if self.idle_power_w is not None:
            return self.idle_power_w
        coef = self.power_fit.solve()
        if coef is None or coef[0] <= 0 or coef[1] <= 0 or coef[1] > coef[0]:
            return None
        return coef[1]

    def learn_prices(
        self,
        *,
        prefill_j: float,
        decode_j: float,
        prefill_tokens: float,
        decode_tokens: float,
        rate: float,
        rate_seen: bool,
        busy_j: float,
        busy_s: float,
    ) -> None:
        """Joules per decode token and per prompt token, and the busy power, of the latest busy split."""
        if decode_tokens > 0:
            self.j_per_decode_token = decode_j / decode_tokens
            self.decode_rate_per_s, self.decode_rate_seen = rate, rate_seen
        if prefill_tokens > 0 and prefill_j > 0:
            self.j_per_prompt_token = prefill_j / prefill_tokens
        elif self.j_per_decode_token is not None:
            calibrated = self.calibrated_prefill_j_per_token()
            self.j_per_prompt_token = (
                calibrated if calibrated is not None else self.prefill_weight * self.j_per_decode_token
            )
        if busy_s > 0:
            self.busy_power_w = busy_j / busy_s
