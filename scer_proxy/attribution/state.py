"""The interval state of a timeline: its open requests, the intervals waiting to be split, its counters."""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field


@dataclass(slots=True)
class OpenRequest:
    """A request on the timeline, from its start until a reading after its end settles it."""

    rid: str
    start_s: float
    prompt_tokens: int
    stream: bool = True
    first_token_s: float | None = None  # seen on a stream, or inferred from a non-stream's end
    inferred_decode_s: float = 0.0  # the decode time subtracted from a non-stream's end to infer it
    end_s: float | None = None
    last_token_s: float | None = None  # a stream's latest chunk
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
    context_j: float = 0.0  # the energy of the intervals it was in, over the time it was in them
    estimated_j: float = 0.0  # the part of its energy counted from estimates (decode time at a rate)
    intervals: int = 0


@dataclass(slots=True)
class PendingInterval:
    """A meter interval waiting to be split, with the stream tokens each request received in it."""

    t0_s: float
    t1_s: float
    energy_j: float
    tokens: dict[str, int]


@dataclass(slots=True)
class IntervalState:
    requests: dict[str, OpenRequest] = field(default_factory=dict)
    intervals: list[PendingInterval] = field(default_factory=list)
    pinned_until_s: float = -math.inf  # the end of the last pinned prefill
    queue_end_s: float = -math.inf  # the end of the last prefill placed by estimate
    last_end_s: float = -math.inf  # the latest end of a finished request
    # When streamed tokens arrived (recent ones): each marks the end of a decode step.
    step_ends_s: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=256))
    last_t_s: float | None = None
    last_energy_j: float | None = None
    last_power_w: float | None = None
    interval_s: float | None = None  # the typical length of a meter interval (a running mean)
    timing_noise_s: float = 0.0  # how late the proxy's clock readings run (an upper running mean)
    split_until_s: float | None = None  # the end of the last interval split (later ones may wait)
    measured_j: float = 0.0  # the energy of every usable interval read
    idle_j: float = 0.0  # idle energy reported apart (``idle = "separate"``)

    def step_end_after(self, t_s: float, before_s: float) -> float | None:
        """The first decode step seen ending in [t_s, before_s), or None."""
        for end in self.step_ends_s:  # oldest first; a few hundred at most
            if t_s <= end < before_s:
                return end
        return None

    def queued(self) -> list[OpenRequest]:
        """The requests whose prefill window is not pinned yet, in arrival order."""
        return [r for r in self.requests.values() if not r.pinned]
