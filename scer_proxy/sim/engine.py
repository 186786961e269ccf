"""The continuous-batching engine of the simulated GPU: a pure, clock-driven core with no I/O.

Simulated time is ``(clock() - start) x time_scale`` seconds; ``clock`` is injected (default
``time.monotonic``) so that tests drive it by hand and get exact figures. The engine moves through
*phases*, each with a constant power for all the profile's GPUs:

* **prefill** of one newly admitted sequence: ``prompt_tokens / prefill_tokens_per_s`` seconds at
  ``prefill_power_w``; all its energy belongs to that sequence.
* **decode step** of the ``b`` running (prefilled) sequences: ``step_time_s(b)`` seconds at
  ``power_w(b)``; one token for each of them at the end of the step, the energy split equally.
  (Prefill itself emits no token: a sequence's first token ends its first decode step.)
* **idle**, when nothing runs: ``idle_power_w``, owed to nobody (``idle_j``).

At each phase boundary waiting sequences are admitted in FIFO order up to ``max_num_seqs``
(prefilling and decoding together); admitted sequences are prefilled one by one, in order, before
the next decode step. A phase that has started always runs to its end (the GPU has launched the
work): a sequence cancelled mid-phase is charged its share of that phase, receives no token from
it, and takes part in no later phase, so it leaves the batch within one engine step.

Energy is integrated exactly and attributed as it accrues: ``advance(t)`` adds ``power x dt`` of
every phase (or part of one) up to ``t`` both to the cumulative counter and to the owners of that
phase, so at any moment ``counter_j == attributed_j + idle_j`` and ``attributed_j`` is the sum of
every sequence's energy. A DCGM-style published reading (counter and mean power over the period)
is refreshed at every multiple of ``metrics_period_s`` of simulated time, with the exact value of
the counter at that instant.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from scer_proxy.sim.profiles import Profile

DEFAULT_MAX_RECORDS = 100_000


class SeqStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"


@dataclass(eq=False, slots=True)
class Sequence:
    """One request inside the engine, and its ground-truth record."""

    id: str
    prompt_tokens: int
    target_tokens: int
    arrived_s: float
    listener: Callable[[], None] | None = None
    status: SeqStatus = SeqStatus.QUEUED
    completion_tokens: int = 0
    prefill_energy_j: float = 0.0
    decode_energy_j: float = 0.0
    first_token_s: float | None = None
    finished_s: float | None = None

    @property
    def energy_j(self) -> float:
        return self.prefill_energy_j + self.decode_energy_j

    @property
    def done(self) -> bool:
        return self.status in (SeqStatus.FINISHED, SeqStatus.CANCELLED)

    def truth(self) -> dict[str, object]:
        """The ground-truth JSON record (times in simulated seconds since the engine started)."""
        return {
            "id": self.id,
            "energy_j": self.energy_j,
            "prefill_energy_j": self.prefill_energy_j,
            "decode_energy_j": self.decode_energy_j,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "status": self.status.value,
            "arrived_s": self.arrived_s,
            "first_token_s": self.first_token_s,
            "finished_s": self.finished_s,
        }

    def _notify(self) -> None:
        if self.listener is not None:
            self.listener()


@dataclass(frozen=True, slots=True)
class MeterReading:
    """A published DCGM-style reading: the counter at ``sim_time_s`` and the mean power of the period."""

    sim_time_s: float
    energy_j: float
    power_w: float


@dataclass(slots=True)
class _Phase:
    kind: str  # "prefill" | "decode"
    start_s: float
    end_s: float
    power_w: float
    seqs: tuple[Sequence, ...]


@dataclass(slots=True)
class EngineStats:
    counter_j: float = 0.0
    attributed_j: float = 0.0
    idle_j: float = 0.0
    steps: int = 0
    prefills: int = 0
    max_batch: int = 0
    step_batches: collections.Counter[int] = field(default_factory=collections.Counter)


class Engine:
    """Continuous batching over a :class:`Profile`, advanced by an injectable clock."""

    def __init__(
        self,
        profile: Profile,
        *,
        clock: Callable[[], float] = time.monotonic,
        time_scale: float = 1.0,
        metrics_period_s: float = 0.1,
        max_records: int = DEFAULT_MAX_RECORDS,
    ) -> None:
        if not (time_scale > 0 and math.isfinite(time_scale)):
            raise ValueError("time_scale must be a positive number")
        if not (metrics_period_s > 0 and math.isfinite(metrics_period_s)):
            raise ValueError("metrics_period_s must be a positive number")
        self.profile = profile
        self.time_scale = time_scale
        self.metrics_period_s = metrics_period_s
        self._clock = clock
        self._clock_start = clock()
        self._max_records = max_records
        self._t_s = 0.0
        self._phase: _Phase | None = None
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._prefill_queue: collections.deque[Sequence] = collections.deque()
        self._decoding: list[Sequence] = []
        self._records: collections.OrderedDict[str, Sequence] = collections.OrderedDict()
        self.stats = EngineStats()
        self._next_publish_k = 1
        self._published = MeterReading(0.0, 0.0, profile.idle_power_w)

    # -- time -------------------------------------------------------------------------------------
    def now_s(self) -> float:
        """Simulated seconds since the engine started, from the clock."""
        return (self._clock() - self._clock_start) * self.time_scale

    @property
    def sim_time_s(self) -> float:
        """The simulated time the engine has been advanced to."""
        return self._t_s

    def sync(self) -> float:
        """Advance to the clock's present; returns the simulated time."""
        now = self.now_s()
        self.advance(now)
        return self._t_s

    def next_event_s(self) -> float | None:
        """End of the phase in progress, or ``None`` when idle (nothing happens until a submit)."""
        return None if self._phase is None else self._phase.end_s

    def real_delay_s(self, sim_delay_s: float) -> float:
        return sim_delay_s / self.time_scale

    # -- state ------------------------------------------------------------------------------------
    @property
    def counter_j(self) -> float:
        """Cumulative energy up to :attr:`sim_time_s` (exact integral of the power timeline)."""
        return self.stats.counter_j

    @property
    def attributed_j(self) -> float:
        return self.stats.attributed_j

    @property
    def idle_j(self) -> float:
        return self.stats.idle_j

    @property
    def active(self) -> int:
        """Sequences admitted to the batch (prefilling or decoding)."""
        return len(self._prefill_queue) + len(self._decoding)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def power_now_w(self) -> float:
        return self.profile.idle_power_w if self._phase is None else self._phase.power_w

    @property
    def published(self) -> MeterReading:
        """The latest reading published at a multiple of ``metrics_period_s``."""
        return self._published

    def truth(self, seq_id: str) -> Sequence | None:
        return self._records.get(seq_id)

    def records(self) -> list[Sequence]:
        return list(self._records.values())

    # -- requests ---------------------------------------------------------------------------------
    def submit(
        self, seq_id: str, prompt_tokens: int, target_tokens: int, listener: Callable[[], None] | None = None
    ) -> Sequence:
        """Queue a request arriving now; it produces exactly ``target_tokens`` unless cancelled."""
        if prompt_tokens < 0:
            raise ValueError("prompt_tokens must be >= 0")
        if target_tokens < 1:
            raise ValueError("target_tokens must be >= 1")
        if seq_id in self._records:
            raise ValueError(f"duplicate sequence id {seq_id!r}")
        now = self.sync()
        seq = Sequence(seq_id, prompt_tokens, target_tokens, now, listener)
        self._records[seq_id] = seq
        while len(self._records) > self._max_records:
            self._records.popitem(last=False)
        self._waiting.append(seq)
        if self._phase is None:
            self._phase = self._schedule(now)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """The client went away: the sequence leaves the batch before the next step."""
        now = self.sync()
        if seq.done:
            return
        if seq.status is SeqStatus.QUEUED:
            self._waiting.remove(seq)
        elif seq in self._decoding:
            self._decoding.remove(seq)
        elif seq in self._prefill_queue:
            self._prefill_queue.remove(seq)
        seq.status = SeqStatus.CANCELLED
        seq.finished_s = now
        seq._notify()
        seq.listener = None

    # -- the core ---------------------------------------------------------------------------------
    def advance(self, t_s: float) -> None:
        """Run the simulation up to simulated time ``t_s`` (never backwards)."""
        t_s = max(t_s, self._t_s)
        while True:
            phase = self._phase
            if phase is None:
                self._accrue(t_s, self.profile.idle_power_w, None)
                return
            self._accrue(min(t_s, phase.end_s), phase.power_w, phase)
            if phase.end_s > t_s:
                return
            self._t_s = phase.end_s
            self._complete(phase)
            self._phase = self._schedule(phase.end_s)

    def _schedule(self, t_s: float) -> _Phase | None:
        profile = self.profile
        while self._waiting and self.active < profile.max_num_seqs:
            seq = self._waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self._prefill_queue.append(seq)
        if self._prefill_queue:
            seq = self._prefill_queue[0]
            duration = seq.prompt_tokens / profile.prefill_tokens_per_s
            return _Phase("prefill", t_s, t_s + duration, profile.prefill_power_w, (seq,))
        if self._decoding:
            batch = len(self._decoding)
            return _Phase(
                "decode", t_s, t_s + profile.step_time_s(batch), profile.power_w(batch), tuple(self._decoding)
            )
        return None

    def _complete(self, phase: _Phase) -> None:
        if phase.kind == "prefill":
            self.stats.prefills += 1
            seq = phase.seqs[0]
            if self._prefill_queue and self._prefill_queue[0] is seq:
                self._prefill_queue.popleft()
                self._decoding.append(seq)
            return
        self.stats.steps += 1
        batch = len(phase.seqs)
        self.stats.step_batches[batch] += 1
        self.stats.max_batch = max(self.stats.max_batch, batch)
        finished: list[Sequence] = []
        for seq in phase.seqs:
            if seq.status is not SeqStatus.RUNNING:
                continue
            seq.completion_tokens += 1
            if seq.first_token_s is None:
                seq.first_token_s = phase.end_s
            if seq.completion_tokens >= seq.target_tokens:
                seq.status = SeqStatus.FINISHED
                seq.finished_s = phase.end_s
                finished.append(seq)
        if finished:
            done = set(map(id, finished))
            self._decoding = [s for s in self._decoding if id(s) not in done]
        for seq in phase.seqs:
            seq._notify()
        for seq in finished:
            seq.listener = None  # nothing more to report; do not keep the waiter alive

    def _accrue(self, t_end_s: float, power_w: float, phase: _Phase | None) -> None:
        """Integrate ``power_w`` from the current time to ``t_end_s``, publishing at period boundaries."""
        t_s = self._t_s
        if t_end_s <= t_s:
            return
        period = self.metrics_period_s
        last_k = math.floor(t_end_s / period)
        if last_k >= self._next_publish_k:
            boundary_s = min(last_k * period, t_end_s)
            if boundary_s > t_s:
                self._add(power_w * (boundary_s - t_s), phase)
                t_s = boundary_s
            if last_k > self._next_publish_k:
                # Several boundaries fall in this stretch (always > the previous time), so the whole
                # last period lies inside it and its mean power is this stretch's power.
                power_period_w = power_w
            else:
                power_period_w = (self.stats.counter_j - self._published.energy_j) / period
            self._published = MeterReading(boundary_s, self.stats.counter_j, power_period_w)
            self._next_publish_k = last_k + 1
        self._add(power_w * (t_end_s - t_s), phase)
        self._t_s = t_end_s

    def _add(self, energy_j: float, phase: _Phase | None) -> None:
        stats = self.stats
        stats.counter_j += energy_j
        if phase is None:
            stats.idle_j += energy_j
            return
        stats.attributed_j += energy_j
        if phase.kind == "prefill":
            phase.seqs[0].prefill_energy_j += energy_j
        else:
            share_j = energy_j / len(phase.seqs)
            for seq in phase.seqs:
                seq.decode_energy_j += share_j
