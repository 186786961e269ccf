"""The accuracy scenario matrix: workloads as an operator's traffic looks, each seeded (pure, no I/O).

Every scenario runs on the deterministic replay (``bench.harness.replay``) in the tests and in
``bench/accuracy.py --matrix``, and over HTTP in ``bench/accuracy.py --matrix --http``. The method is
tuned on ``TUNING_SEED`` and reported on ``REPORT_SEED``: a figure on the seed it was tuned on says
little about the next workload.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bench.harness.replay import ReplayReport, Workload, capacity_per_s, replay

TUNING_SEED = 11
REPORT_SEED = 1
SMALL = "llama-3.1-8b-h100"
LARGE = "llama-3.1-70b-h100x4"
CHAT = Workload(requests=200, concurrency=32, prompt_tokens=(20, 2000), output_tokens=(1, 1000))


@dataclass(frozen=True)
class Scenario:
    name: str
    workload: Workload
    profiles: tuple[str, ...] = (SMALL,)  # two: two models on two engines, one timeline each
    metrics_period_s: float = 0.1  # how often the counter updates
    idle: str = "separate"
    capacity_share: float | None = None  # Poisson arrivals at this share of the engine's capacity

    def workload_for(self, profile: str, seed: int) -> Workload:
        """The workload with ``seed``; arrivals at ``capacity_share`` of ``profile``'s capacity."""
        workload = dataclasses.replace(self.workload, seed=seed)
        if self.capacity_share is not None:
            rate = self.capacity_share * capacity_per_s(profile, workload)
            workload = dataclasses.replace(workload, arrival_rate_per_s=rate)
        return workload


def _open(rate_per_s: float | None = None, **changes: object) -> Workload:
    return dataclasses.replace(CHAT, arrival_rate_per_s=rate_per_s, **changes)  # type: ignore[arg-type]


BURSTS = _open(burst_size=16, burst_gap_s=8.0, requests=128, start_s=2.0, output_tokens=(1, 300))

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("closed-32", CHAT),
    Scenario("open-10rps", _open(10.0)),
    Scenario("poisson-30", _open(), capacity_share=0.3),
    Scenario("poisson-60", _open(), capacity_share=0.6),
    Scenario("poisson-90", _open(), capacity_share=0.9),
    Scenario(
        "long-prompts",
        dataclasses.replace(
            CHAT, requests=60, concurrency=4, prompt_tokens=(4000, 32000), output_tokens=(1, 1)
        ),
    ),
    Scenario(
        "long-prompts-serial",
        dataclasses.replace(
            CHAT, requests=40, concurrency=1, prompt_tokens=(4000, 32000), output_tokens=(1, 1)
        ),
    ),
    Scenario("long-and-chat", _open(long_share=0.3), capacity_share=0.6),
    Scenario("tiny-120rps", _open(120.0, requests=400, prompt_tokens=(5, 40), output_tokens=(1, 12))),
    Scenario(
        "embeddings",
        _open(40.0, prompt_tokens=(8, 512), output_tokens=(1, 1), stream_share=0.0),
    ),
    Scenario("bursts-separate", BURSTS),
    Scenario("bursts-amortize", BURSTS, idle="amortize"),
    Scenario("closed-amortize", CHAT, idle="amortize"),
    Scenario("cancelled-streams", _open(8.0, stream_share=1.0, cancel_share=0.5)),
    Scenario("two-models", _open(5.0), profiles=(SMALL, LARGE)),
    Scenario("70b-4xh100", CHAT, profiles=(LARGE,)),
    Scenario("counter-500ms", CHAT, metrics_period_s=0.5),
    Scenario("counter-1s", CHAT, metrics_period_s=1.0),
)


def scenario(name: str) -> Scenario:
    for s in SCENARIOS:
        if s.name == name:
            return s
    raise KeyError(f"unknown scenario {name!r}; known: {', '.join(s.name for s in SCENARIOS)}")


def replay_scenario(s: Scenario, seed: int = REPORT_SEED) -> ReplayReport:
    """The scenario on the replay; with two profiles, each on its own engine and timeline, pooled."""
    pooled = ReplayReport()
    for profile in s.profiles:
        rep = replay(
            profile, workload=s.workload_for(profile, seed), idle=s.idle, metrics_period_s=s.metrics_period_s
        )
        pooled.results += rep.results
        pooled.counter_j += rep.counter_j
        pooled.measured_j += rep.measured_j
        pooled.attributed_j += rep.attributed_j
        pooled.idle_j += rep.idle_j
        pooled.max_interval_imbalance_rel = max(
            pooled.max_interval_imbalance_rel, rep.max_interval_imbalance_rel
        )
    return pooled
