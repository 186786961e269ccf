"""Per-request energy against the simulator's truth (the energy issue's acceptance bounds)."""

from __future__ import annotations

import asyncio
import math

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
    assert len(settled) == 200 and len(header) == 200  # every request has both figures
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


def test_http_run_settles_every_record_and_conserves_the_meters_energy() -> None:
    """The whole proxy over HTTP, seeing only HTTP and the DCGM-style counter, against the simulator.

    Only what load cannot move is asserted: every request's record exists, settles, carries the meter's
    source and the simulator's token counts, and the proxy's measured energy is attributed or idle to
    the joule. The accuracy bounds (settled median 5 %, p95 15 %, header median 10 %) are asserted on
    the virtual clock by ``test_replay_accuracy_bounds`` for this workload, profile and idle policy (and
    three more): in real time on a busy machine the event loops' delays move the proxy's observation of
    each request, and with it the per-request error. ``bench/accuracy.py`` prints the HTTP figures.
    """
    workload = Workload(**WORKLOAD)  # type: ignore[arg-type]
    report = asyncio.run(
        run_accuracy("llama-3.1-8b-h100", idle="separate", time_scale=1.0, workload=workload)
    )
    summary = report.summary()
    figures = {k: v for k, v in summary.items() if isinstance(v, int | float)}  # reported, shown on failure
    print("http accuracy (reported, bounded on the replay):", figures)
    assert summary["requests"] == 200 and len({r.request_id for r in report.results}) == 200, figures
    missing = [r.request_id for r in report.results if not r.record]
    assert not missing, missing  # every request's record is in the ledger ...
    unsettled = [r.request_id for r in report.results if not r.record["settled"] or r.settled_j is None]
    assert not unsettled, unsettled  # ... and settled
    assert all(math.isfinite(r.settled_j) and r.settled_j >= 0 for r in report.results)  # type: ignore[arg-type]
    # Every response carried its energy figure (header or the stream's usage), estimated or not.
    assert [r.request_id for r in report.results if r.header_j is None] == []
    assert {r.record["energy_source"] for r in report.results} == {"simulated"}
    assert {r.record["status"] for r in report.results} == {"ok"}
    # Each request produced exactly its planned output (ignore_eos), streamed or not as planned, and the
    # record counts the tokens the simulator produced.
    assert sorted((r.completion_tokens, r.stream) for r in report.results) == sorted(
        (p.output_tokens, p.stream) for p in workload.plan()
    )
    assert all(r.record["completion_tokens"] == r.completion_tokens for r in report.results)
    # Conservation: attributed + idle = the energy the proxy measured, which is the counter's increase.
    assert summary["conservation_rel"] is not None and summary["conservation_rel"] <= 1e-9, figures
    assert summary["measured_vs_counter_rel"] is not None and summary["measured_vs_counter_rel"] <= 1e-9, (
        figures
    )
