"""The meter runtime hands settled shares on without holding the event loop for a whole reading's worth;
states the timeline's uncertainty where it gives one; voids requests that used no GPU."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest

from scer_proxy.attribution.timeline import Share, Timeline, TimelineConfig
from scer_proxy.meters import MeterError, Reading
from scer_proxy.meters.sampler import SETTLE_BATCH, UpstreamMeter


def _meter(got: list[str]) -> UpstreamMeter:
    return UpstreamMeter(
        "local",
        None,
        Timeline(TimelineConfig(prefill_weight=None, idle="separate")),
        interval_s=0.1,
        on_settled=lambda upstream, share: got.append(share.rid),
    )


SHARES = tuple(Share(f"scer-{i}", 1.0, 0.25, 0.75, 0.01, True) for i in range(5 * SETTLE_BATCH + 3))


async def test_settling_many_requests_lets_other_work_run_in_between() -> None:
    got: list[str] = []
    seen_by_other: list[int] = []

    async def other() -> None:  # stands for requests arriving while a reading settles
        while True:
            seen_by_other.append(len(got))
            await asyncio.sleep(0)

    task = asyncio.create_task(other())
    await asyncio.sleep(0)
    seen_by_other.clear()
    await _meter(got)._settle(SHARES)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert got == [s.rid for s in SHARES], "every share, in order"
    # The other task ran between batches, each time seeing a whole number of batches settled.
    assert [n for n in seen_by_other if 0 < n < len(SHARES)] == [SETTLE_BATCH * k for k in range(1, 6)]


async def test_a_shutdown_while_settling_still_hands_on_every_share() -> None:
    got: list[str] = []
    task = asyncio.create_task(_meter(got)._settle(SHARES))
    await asyncio.sleep(0)  # the first batch is handed on, then the task yields
    assert len(got) == SETTLE_BATCH
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert got == [s.rid for s in SHARES], "the settled figures are not derivable again: none is dropped"


class _Counter:
    """A meter whose counter the test sets (the sampler is not run: readings go to the timeline directly)."""

    source = "simulated"

    async def read(self) -> Reading:  # pragma: no cover - not sampled here
        raise MeterError("not read in these tests")

    def describe(self) -> dict[str, Any]:
        return {"kind": "simulated", "devices": []}

    async def close(self) -> None:
        pass


class _StatingTimeline(Timeline):
    """A timeline that states a given bound for its estimates."""

    def estimate(self, rid: str, now_s: float) -> Share | None:
        share = super().estimate(rid, now_s)
        return None if share is None else dataclasses.replace(share, uncertainty_rel=0.031)


class _SilentTimeline(Timeline):
    """A timeline that states no bound (the meter falls back to its heuristic)."""

    def estimate(self, rid: str, now_s: float) -> Share | None:
        share = super().estimate(rid, now_s)
        return None if share is None else dataclasses.replace(share, uncertainty_rel=None)


def _metered(timeline: Timeline, now: list[float]) -> UpstreamMeter:
    return UpstreamMeter(
        "local", _Counter(), timeline, interval_s=0.1, on_settled=lambda u, s: None, clock=lambda: now[0]
    )


@pytest.mark.parametrize("stating", [False, True])
def test_a_stated_uncertainty_replaces_the_heuristic(stating: bool) -> None:
    now = [0.0]
    timeline = (_StatingTimeline if stating else _SilentTimeline)(TimelineConfig(idle="separate"))
    meter = _metered(timeline, now)
    timeline.reading(0.0, 0.0)
    meter.start_request("r1", 100, stream=False)
    now[0] = 0.5
    timeline.reading(0.5, 200.0)
    share, uncertainty, _flags = meter.finish_request("r1", 100, 20, model="m")
    assert share is not None and share.energy_j > 0
    heuristic = meter.uncertainty_rel(0.5, settled=False)
    assert uncertainty == (0.031 if stating else heuristic) and heuristic != 0.031
    # At settlement: the settled share's own bound where it states one.
    settled = Share("r1", 1.0, 0.5, 0.5, 0.1, True)
    assert meter.stated_uncertainty(settled, 0.5, settled=True) == meter.uncertainty_rel(0.5, settled=True)
    stated = dataclasses.replace(settled, uncertainty_rel=0.02)
    assert meter.stated_uncertainty(stated, 0.5, settled=True) == 0.02


@pytest.mark.parametrize("idle", ["separate", "amortize"])
def test_a_voided_request_leaves_with_a_settled_zero_and_its_energy_goes_to_idle(idle: str) -> None:
    now = [0.0]
    timeline = Timeline(TimelineConfig(idle=idle))
    meter = _metered(timeline, now)
    timeline.reading(0.0, 0.0)
    meter.start_request("gone", 50, stream=False)
    now[0] = 0.5
    timeline.reading(0.5, 100.0)  # split while the request was on the timeline: it got some of this
    assert timeline.estimate("gone", 0.5) is not None and timeline.pending() == 1
    share = meter.void_request("gone")
    assert share == Share("gone", 0.0, 0.0, 0.0, 0.0, True, idle_j=0.0, uncertainty_rel=0.0)
    assert timeline.pending() == 0 and timeline.estimate("gone", 0.5) is None
    # None of the measured energy is lost: it is idle now (apart, or in the balance).
    assert timeline.idle_j + timeline.idle_balance_j == pytest.approx(timeline.measured_j, rel=1e-12)
    # An upstream with neither meter nor estimator has no figure, not even a zero.
    bare = UpstreamMeter("bare", None, Timeline(), interval_s=0.1, on_settled=lambda u, s: None)
    bare.start_request("x", 10, stream=False)
    assert bare.void_request("x") is None and bare.timeline.pending() == 0


class _SteadyMeter(_Counter):
    """A counter that reads at once, 100 J more each time."""

    def __init__(self) -> None:
        self.energy_j = 0.0

    async def read(self) -> Reading:
        self.energy_j += 100.0
        return Reading(time.monotonic(), self.energy_j)

    async def close(self) -> None:
        pass


async def test_a_late_event_loop_shows_as_timing_noise() -> None:
    """The sampler measures how late its timer fires; a loop held up by other work raises the noise the
    timeline states bounds with, and a punctual loop keeps it near zero."""

    timeline = Timeline(TimelineConfig(prefill_weight=None, idle="separate"))
    meter = UpstreamMeter("local", _SteadyMeter(), timeline, interval_s=0.01, on_settled=lambda u, s: None)
    meter.start()
    await asyncio.sleep(0.3)
    quiet_s = timeline.state.timing_noise_s
    for _ in range(10):  # other work holding the loop 30 ms at a time
        time.sleep(0.03)  # noqa: ASYNC251 - the point: work that holds the loop
        await asyncio.sleep(0)
    busy_s = timeline.state.timing_noise_s
    await meter.close()
    assert busy_s > max(0.01, quiet_s)
    assert meter.describe()["timing_noise_ms"] == pytest.approx(busy_s * 1000.0)
