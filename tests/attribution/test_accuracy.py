"""Per-request energy against the simulator's truth (the energy issue's acceptance bounds)."""

from __future__ import annotations

import asyncio

import pytest

from bench.harness.accuracy import run_accuracy
from bench.harness.replay import Workload, percentile, replay

# At least 200 requests, 32 concurrent, streamed and not, prompts of 20 to 2,000 tokens, outputs of 1 to 1,000.
WORKLOAD = dict(
    requests=200, concurrency=32, prompt_tokens=(20, 2000), output_tokens=(1, 1000), stream_share=0.5
)


@pytest.mark.parametrize("profile", ["llama-3.1-8b-h100", "llama-3.1-70b-h100x4"])
@pytest.mark.parametrize("idle", ["separate", "amortize"])
def test_replay_accuracy_bounds(profile: str, idle: str) -> None:
    report = replay(profile, idle=idle, workload=Workload(**WORKLOAD))  # type: ignore[arg-type]
    settled, header = report.errors("settled"), report.errors("header")
    assert len(settled) == 200
    assert percentile(settled, 0.5) <= 0.05
    assert percentile(settled, 0.95) <= 0.15
    assert percentile(header, 0.5) <= 0.10
    assert abs(report.attributed_j + report.idle_j - report.measured_j) <= 1e-9 * report.measured_j
    assert report.max_interval_imbalance_rel <= 1e-9


def test_replay_with_idle_gaps_reports_idle_apart() -> None:
    workload = Workload(requests=60, concurrency=4, idle_gap_s=0.5, seed=5)
    report = replay("llama-3.1-8b-h100", idle="separate", workload=workload)
    assert report.idle_j > 0
    assert percentile(report.errors("settled"), 0.5) <= 0.05
    amortized = replay("llama-3.1-8b-h100", idle="amortize", workload=workload)
    # Amortized totals include the idle energy: more than the truth, and everything attributed.
    assert amortized.attributed_j > report.attributed_j
    assert amortized.attributed_j + amortized.idle_j == pytest.approx(amortized.measured_j, rel=1e-9)


def test_http_accuracy_bounds_against_the_simulator() -> None:
    """The whole proxy, seeing only HTTP and the DCGM-style counter, against the simulator's truth."""
    report = asyncio.run(
        run_accuracy("llama-3.1-8b-h100", idle="separate", time_scale=1.0, workload=Workload(**WORKLOAD))
    )  # type: ignore[arg-type]
    summary = report.summary()
    figures = {k: v for k, v in summary.items() if isinstance(v, int | float)}  # shown when a bound fails
    assert summary["requests"] == 200, figures
    assert len(report.errors("settled")) == 200, figures  # every record settled
    assert summary["settled_median"] <= 0.05, figures
    assert summary["settled_p95"] <= 0.15, figures
    assert summary["header_median"] <= 0.10, figures
    assert summary["conservation_rel"] <= 0.001, figures
