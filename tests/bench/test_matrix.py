"""The accuracy matrix's row (pure) and the scenarios over HTTP (what load cannot move)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from dataclasses import dataclass

import pytest

from bench.harness.accuracy import run_scenario_http
from bench.harness.matrix import format_row, matrix_row, quantile, report_row, table_header
from bench.harness.replay import ReplayReport, ReplayResult
from bench.harness.scenarios import scenario


@dataclass
class R:
    true_j: float
    settled_j: float | None
    header_j: float | None
    settled_unc: float | None = None
    header_unc: float | None = None
    idle_j: float | None = None


def test_quantiles_of_the_settled_and_header_errors() -> None:
    # Settled errors 1 %, 2 %, ..., 100 %; header errors 10 % each.
    results = [R(100.0, 100.0 + i, 90.0) for i in range(1, 101)]
    row = matrix_row("x", results)
    assert row.requests == 100 and row.settled_n == 100 and row.header_n == 100
    assert row.settled_p50 == pytest.approx(0.51)  # nearest rank of 0.5 * 99 = 49.5 -> index 50
    assert row.settled_p95 == pytest.approx(0.95)
    assert row.settled_p99 == pytest.approx(0.99)
    assert row.settled_max == pytest.approx(1.0)
    assert row.header_p50 == pytest.approx(0.1) and row.header_p95 == pytest.approx(0.1)
    assert quantile([], 0.5) is None
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0


def test_missing_figures_none_and_nan_are_left_out() -> None:
    results = [
        R(10.0, 11.0, None),
        R(10.0, math.nan, 12.0),
        R(10.0, None, math.nan),
        R(0.0, 1.0, 1.0),  # no truth to compare with
        R(math.nan, 1.0, 1.0),
    ]
    row = matrix_row("x", results)
    assert row.requests == 5
    assert row.settled_n == 1 and row.settled_p50 == pytest.approx(0.1)
    assert row.header_n == 1 and row.header_max == pytest.approx(0.2)
    assert row.settled_coverage is None and row.header_coverage is None  # nobody stated an uncertainty
    assert row.settled_bound_ratio is None
    empty = matrix_row("empty", [])
    assert empty.settled_p50 is None and empty.settled_max is None and empty.header_p95 is None


def test_coverage_and_bound_ratio() -> None:
    results = [
        R(100.0, 101.0, 104.0, settled_unc=0.05, header_unc=0.03),  # 1 % within 5 %; 4 % outside 3 %
        R(100.0, 103.0, 102.0, settled_unc=0.05, header_unc=0.03),  # 3 % within; 2 % within
        R(100.0, 110.0, 101.0, settled_unc=0.05, header_unc=math.nan),  # 10 % outside; no header bound
        R(100.0, 102.0, 101.0, settled_unc=None, header_unc=None),  # no bound: not counted
    ]
    row = matrix_row("x", results)
    assert row.settled_coverage == pytest.approx(2 / 3)
    assert row.header_coverage == pytest.approx(1 / 2)
    # Median bound 5 % over the median error (of those with a bound) 3 %.
    assert row.settled_bound_ratio == pytest.approx(0.05 / 0.03)
    assert row.header_bound_ratio == pytest.approx(0.03 / 0.04)  # nearest rank of [2 %, 4 %] -> 4 %
    assert row.settled_n == 4  # the errors still count every request with a figure


def test_the_settled_error_is_on_the_active_part() -> None:
    # Amortized idle inflates the settled figure; taken off, the active part matches the truth.
    results = [R(100.0, 130.0, 100.0, idle_j=30.0), R(100.0, 100.0, 100.0, idle_j=None)]
    assert matrix_row("x", results).settled_max == pytest.approx(0.0)
    assert matrix_row("x", results, active_only=False).settled_max == pytest.approx(0.3)

    @dataclass
    class Replayed:  # the replay's name for the idle share
        true_j: float
        settled_j: float
        header_j: float
        settled_idle_j: float

    assert matrix_row("x", [Replayed(100.0, 120.0, 100.0, 20.0)]).settled_max == pytest.approx(0.0)


def test_replay_results_before_they_state_uncertainties() -> None:
    report = ReplayReport(
        results=[ReplayResult("r0", False, 10, 5, 100.0, 102.0, 101.0)],
        measured_j=200.0,
        attributed_j=150.0,
        idle_j=50.0,
    )
    row = report_row("closed-32", report)
    assert row.settled_p50 == pytest.approx(0.01) and row.header_p50 == pytest.approx(0.02)
    assert row.settled_coverage is None and row.conservation_rel == pytest.approx(0.0)
    assert "closed-32" in format_row(row) and "-" in format_row(row)  # missing coverage shows as "-"
    assert table_header().startswith("scenario")


def test_scenarios_over_http_cancel_settle_and_route_by_model() -> None:
    """Only what load cannot move: records, statuses, settlement, truth and routing."""
    began = time.monotonic()
    cancels = scenario("cancelled-streams")
    small = dataclasses.replace(
        cancels, workload=dataclasses.replace(cancels.workload, requests=12, output_tokens=(20, 150))
    )
    # Seed 4 plans 7 cancellations, each at least 50 tokens before the stream's end: the simulator has
    # not finished any of them when the client goes away, however slow the machine.
    report = asyncio.run(run_scenario_http(small, seed=4, time_scale=1.0))
    assert len(report.results) == 12
    assert all(r.record for r in report.results)  # every request has a record ...
    assert all(r.record["settled"] and r.settled_j is not None for r in report.results)  # ... settled
    cancelled = [r for r in report.results if r.cancel_after is not None]
    assert cancelled, "the seed plans no cancellation"
    assert {r.record["status"] for r in cancelled} == {"cancelled"}
    assert {r.truth["status"] for r in cancelled} == {"cancelled"}
    assert {r.record["status"] for r in report.results if r.cancel_after is None} == {"ok"}
    assert all(r.truth["completion_tokens"] >= r.cancel_after for r in cancelled)  # type: ignore[operator]

    two = scenario("two-models")
    short = dataclasses.replace(
        two, workload=dataclasses.replace(two.workload, requests=6, output_tokens=(1, 60))
    )
    report = asyncio.run(run_scenario_http(short, seed=3, time_scale=1.0))
    assert len(report.results) == 12
    assert {r.profile for r in report.results} == set(two.profiles)
    assert all(r.record["upstream"] == r.upstream == r.profile for r in report.results)
    assert all(r.record["settled"] and r.settled_j is not None and r.true_j > 0 for r in report.results)
    assert {r.record["status"] for r in report.results} == {"ok"}
    print(f"http scenarios: {time.monotonic() - began:.1f} s")
