"""What a timeline learns from its readings and requests: token and prefill rates, idle power, prices."""

from __future__ import annotations

from dataclasses import dataclass

from scer_proxy.attribution.calibration import Calibration

DEFAULT_PREFILL_WEIGHT = 0.1
"""Decode-token equivalents per prompt token while ``auto`` has not calibrated (and as its prior).

ML.ENERGY v3, Llama-3.1-8B on one H100: a decode token costs 0.1 to 0.45 J, a prompt token about 0.02 J.
"""
FIRST_RATE_MIN_TOKENS = 16  # tokens a non-streamed request needs for its rate to replace the prior


@dataclass(slots=True)
class Learned:
    """The timeline's running estimates; each ``learn_*`` folds in one observation."""

    prefill_weight: float = DEFAULT_PREFILL_WEIGHT  # fixed, or the prior while ``calibration`` is unsolved
    calibration: Calibration | None = None  # None: the prefill weight is fixed
    token_interval_s: float = 0.02  # per-sequence seconds per token
    token_interval_learned: bool = False  # a non-stream of FIRST_RATE_MIN_TOKENS replaced the prior
    prefill_tokens_per_s: float = 10_000.0
    idle_power_w: float | None = None
    j_per_decode_token: float | None = None
    decode_rate_per_s: float = 0.0  # the per-sequence rate of the split that set j_per_decode_token
    decode_rate_seen: bool = False  # ... and whether streams showed it
    j_per_prompt_token: float = 0.0
    busy_power_w: float | None = None

    def calibrated_prefill_j_per_token(self) -> float | None:
        solution = self.calibration.solve() if self.calibration is not None else None
        return solution[0] if solution is not None else None

    def learn_stream_interval(self, interval_s: float) -> None:
        """A stream's mean time between tokens, averaged in."""
        self.token_interval_s += 0.2 * (interval_s - self.token_interval_s)

    def learn_token_interval(self, interval_s: float, tokens: int) -> None:
        """A non-streamed request's time per token, averaged in; the first of at least
        ``FIRST_RATE_MIN_TOKENS`` tokens replaces the prior outright, since non-streams are split at this
        rate while no stream shows it and a server can be ten times off the prior. Streams only average
        in: the first to end are short ones, and this interval also groups first tokens."""
        if not self.token_interval_learned and tokens >= FIRST_RATE_MIN_TOKENS:
            self.token_interval_s, self.token_interval_learned = interval_s, True
        else:
            self.token_interval_s += 0.2 * (interval_s - self.token_interval_s)

    def learn_prefill_rate(self, tokens_per_s: float) -> None:
        self.prefill_tokens_per_s += 0.3 * (tokens_per_s - self.prefill_tokens_per_s)

    def learn_idle_power(self, power_w: float) -> None:
        self.idle_power_w = (
            power_w
            if self.idle_power_w is None
            else (self.idle_power_w + 0.2 * (power_w - self.idle_power_w))
        )

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
