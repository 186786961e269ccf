"""Replay: the attribution method against the simulator's truth in virtual time (pure, no I/O).

The simulator's engine runs on a virtual clock; a closed-loop workload submits requests to it; the
proxy's timeline observes exactly what the proxy would see over HTTP (a request's start, each
streamed token as it is produced, the end; for non-streamed requests only start and end) and reads
the DCGM-style counter, which refreshes every ``metrics_period_s``, every ``sample_interval_s``:
25.1 ms, not 25, so the reads drift across the counter's period as a proxy's timer does against an
exporter's clock (a fixed phase would time every value with the same small error). With no
event-loop jitter this measures the method itself; ``bench.harness.accuracy`` measures
the whole proxy over HTTP.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from scer_proxy.attribution.readings import ValueClock
from scer_proxy.attribution.timeline import Share, Timeline, TimelineConfig
from scer_proxy.sim.engine import Engine, Sequence
from scer_proxy.sim.profiles import get_profile


@dataclass(frozen=True, slots=True)
class Planned:
    """One request of a workload: its shape, when it arrives and whether its client goes away."""

    prompt_tokens: int
    output_tokens: int
    stream: bool
    at_s: float | None = None  # arrival time (open loop); None: when a closed-loop client is free
    cancel_after: int | None = None  # a stream whose client disconnects after this many chunks


@dataclass(frozen=True)
class Workload:
    """A seeded request mix and arrival process, the same for the replay and the HTTP harness.

    Closed loop by default (``concurrency`` clients, each sending its next request ``idle_gap_s`` after
    the last one ended); ``arrival_rate_per_s`` makes it open loop with Poisson arrivals, and
    ``burst_size`` open loop in bursts of that many requests every ``burst_gap_s``.
    """

    requests: int = 200
    concurrency: int = 32
    prompt_tokens: tuple[int, int] = (20, 2000)
    output_tokens: tuple[int, int] = (1, 1000)
    stream_share: float = 0.5
    seed: int = 1
    idle_gap_s: float = 0.0  # pause between a closed-loop client's requests
    arrival_rate_per_s: float | None = None
    burst_size: int = 0
    burst_gap_s: float = 0.0
    start_s: float = 0.0  # idle before the first arrival
    long_share: float = 0.0  # requests with a long prompt and a short output, mixed in
    long_prompt_tokens: tuple[int, int] = (4000, 32000)
    long_output_tokens: tuple[int, int] = (1, 8)
    cancel_share: float = 0.0  # share of streams whose client disconnects ...
    cancel_chunks: tuple[int, int] = (1, 60)  # ... after this many chunks

    @property
    def open_loop(self) -> bool:
        return self.arrival_rate_per_s is not None or self.burst_size > 0

    def plan(self) -> list[Planned]:
        """Each request's shape and arrival, drawn from ``seed``."""
        rng = random.Random(self.seed)
        out: list[Planned] = []
        t = self.start_s
        for i in range(self.requests):
            prompt, output = rng.randint(*self.prompt_tokens), rng.randint(*self.output_tokens)
            stream = rng.random() < self.stream_share
            if self.long_share and rng.random() < self.long_share:
                prompt, output = rng.randint(*self.long_prompt_tokens), rng.randint(*self.long_output_tokens)
            cancel = None
            if stream and self.cancel_share and rng.random() < self.cancel_share:
                cancel = rng.randint(*self.cancel_chunks)
                cancel = cancel if cancel < output else None  # a client that waits for the end did not cancel
            at: float | None = None
            if self.burst_size > 0:
                at = self.start_s + (i // self.burst_size) * self.burst_gap_s
            elif self.arrival_rate_per_s is not None:
                t += rng.expovariate(self.arrival_rate_per_s)
                at = t
            out.append(Planned(prompt, output, stream, at, cancel))
        return out


def capacity_per_s(profile_name: str, workload: Workload) -> float:
    """The requests a second the profile's engine completes at its full batch for ``workload``'s mix: the
    GPU time a request takes is its prefill plus its share of the decode steps of a full batch."""
    profile = get_profile(profile_name)
    plan = workload.plan()
    batch = profile.max_num_seqs
    per_token_s = profile.step_time_s(batch) / batch
    gpu_s = sum(p.prompt_tokens / profile.prefill_tokens_per_s + p.output_tokens * per_token_s for p in plan)
    return len(plan) / gpu_s


@dataclass
class ReplayResult:
    rid: str
    stream: bool
    prompt_tokens: int
    completion_tokens: int
    true_j: float
    header_j: float
    settled_j: float
    idle_j: float = 0.0  # the amortized idle share in settled_j
    settled_unc: float | None = None  # the stated uncertainty of each figure
    header_unc: float | None = None
    settle_readings: int | None = None  # new counter values read after its end until it settled


@dataclass
class ReplayReport:
    results: list[ReplayResult] = field(default_factory=list)
    counter_j: float = 0.0
    measured_j: float = 0.0
    attributed_j: float = 0.0
    idle_j: float = 0.0
    max_interval_imbalance_rel: float = 0.0

    def errors(self, which: str) -> list[float]:
        return relative_errors(self.results, which)


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def replay(
    profile_name: str = "llama-3.1-8b-h100",
    *,
    workload: Workload = Workload(),
    idle: str = "separate",
    prefill_weight: float | None = None,
    metrics_period_s: float = 0.1,
    sample_interval_s: float = 0.0251,
    sample_phase_s: float = 0.0137,
) -> ReplayReport:
    """Run the workload on a virtual clock; returns the per-request figures and the balances."""
    profile = get_profile(profile_name)
    clock = _Clock()
    engine = Engine(profile, clock=clock, metrics_period_s=metrics_period_s)
    timeline = Timeline(TimelineConfig(idle=idle, prefill_weight=prefill_weight))
    plan = workload.plan()
    report = ReplayReport()
    running: dict[str, tuple[Sequence, Planned, int]] = {}  # rid -> (sequence, plan, tokens seen)
    headers: dict[str, Share | None] = {}
    settled: dict[str, Share] = {}
    next_index = 0
    # Closed loop: when each client is free (-1 while busy); open loop: the arrivals' own times.
    client_free_at = [] if workload.open_loop else [workload.start_s] * workload.concurrency
    slot_of: dict[str, int] = {}
    next_sample = sample_phase_s  # the proxy's reads are not in step with the counter's updates
    last_published = None
    value_clock = ValueClock()
    awaiting: dict[str, int] = {}  # ended, not settled: new counter values read since the end
    lag: dict[str, int] = {}
    first_counter = engine.published.energy_j

    def begin(now: float, slot: int | None) -> None:
        nonlocal next_index
        planned = plan[next_index]
        rid = f"r{next_index}"
        next_index += 1
        seq = engine.submit(rid, planned.prompt_tokens, planned.output_tokens)
        running[rid] = (seq, planned, 0)
        timeline.start(rid, now, planned.prompt_tokens, stream=planned.stream)
        if slot is not None:
            client_free_at[slot] = -1.0  # busy
            slot_of[rid] = slot

    def submit(now: float) -> None:
        if workload.open_loop:
            while next_index < len(plan) and (plan[next_index].at_s or 0.0) <= now:
                begin(now, None)
            return
        for slot, free_at in enumerate(client_free_at):
            if next_index < len(plan) and 0 <= free_at <= now:
                begin(now, slot)

    def next_arrival() -> list[float]:
        if workload.open_loop:
            return [plan[next_index].at_s or 0.0] if next_index < len(plan) else []
        return [t for t in client_free_at if t > clock.t]

    def sample() -> None:
        """The proxy reads the counter: a new published value closes an interval."""
        nonlocal last_published
        published = engine.published
        value_s = value_clock.observe(clock.t, published is not last_published)
        if value_s is None:
            return
        last_published = published
        result = timeline.reading(value_s, published.energy_j)
        if result is None:
            return
        for share in result.settled:
            settled[share.rid] = share
        for rid in list(awaiting):
            awaiting[rid] += 1
        for share in result.settled:
            lag[share.rid] = awaiting.pop(share.rid, 0)
        imbalance = abs(result.energy_j - result.attributed_j - result.idle_j - result.carried_j)
        if result.energy_j > 0:
            report.max_interval_imbalance_rel = max(
                report.max_interval_imbalance_rel, imbalance / result.energy_j
            )

    submit(clock.t)
    while running or next_index < len(plan):
        candidates = [next_sample, *next_arrival()]
        phase_end = engine.next_event_s()
        if phase_end is not None:
            candidates.append(phase_end)
        clock.t = max(min(candidates), clock.t)
        engine.sync()
        # What the proxy sees at this instant: new tokens of streams, ends of requests, and clients
        # that go away mid-stream (the engine drops them before its next step).
        for rid, (seq, planned, seen) in list(running.items()):
            if planned.stream and seq.completion_tokens > seen:
                timeline.tokens(rid, clock.t, seq.completion_tokens - seen)
                seen = seq.completion_tokens
                running[rid] = (seq, planned, seen)
            if not seq.done and planned.cancel_after is not None and seen >= planned.cancel_after:
                engine.cancel(seq)
            if seq.done:
                timeline.finish(
                    rid, clock.t, seq.prompt_tokens, seen if planned.stream else seq.completion_tokens
                )
                headers[rid] = timeline.estimate(rid, clock.t)
                awaiting[rid] = 0
                del running[rid]
                if rid in slot_of:
                    client_free_at[slot_of[rid]] = clock.t + workload.idle_gap_s
        if clock.t >= next_sample:
            sample()
            next_sample += sample_interval_s
        submit(clock.t)
    # Let the counter publish past the end and settle everything.
    for _ in range(int(4 * metrics_period_s / sample_interval_s) + 2):
        clock.t = next_sample
        engine.sync()
        sample()
        next_sample += sample_interval_s
    for i, planned in enumerate(plan):
        rid = f"r{i}"
        truth = engine.truth(rid)
        assert truth is not None
        final = settled.get(rid)
        header = headers.get(rid)
        report.results.append(
            ReplayResult(
                rid=rid,
                stream=planned.stream,
                prompt_tokens=truth.prompt_tokens,
                completion_tokens=truth.completion_tokens,
                true_j=truth.energy_j,
                header_j=header.energy_j if header is not None else math.nan,
                settled_j=final.energy_j if final is not None else math.nan,
                idle_j=final.idle_j if final is not None else 0.0,
                settled_unc=final.uncertainty_rel if final is not None else None,
                header_unc=header.uncertainty_rel if header is not None else None,
                settle_readings=lag.get(rid),
            )
        )
    report.counter_j = (last_published.energy_j if last_published else 0.0) - first_counter
    report.measured_j = timeline.measured_j
    report.attributed_j = sum(s.energy_j for s in settled.values())
    report.idle_j = timeline.idle_j + timeline.idle_balance_j
    return report


def relative_errors(results: Iterable[Any], which: str) -> list[float]:
    """|figure - truth| / truth per request for the ``header`` or ``settled`` figure (``<which>_j``, the
    settled one less its amortized idle share); a request without that figure (None or NaN) is left out."""
    out = []
    for r in results:
        value = getattr(r, f"{which}_j")
        if which == "settled" and value is not None:
            value -= getattr(r, "idle_j", 0.0) or 0.0  # the truth is the active energy
        if value is not None and not math.isnan(value) and r.true_j > 0:
            out.append(abs(value - r.true_j) / r.true_j)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]
