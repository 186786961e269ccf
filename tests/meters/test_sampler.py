"""The meter runtime hands settled shares on without holding the event loop for a whole reading's worth."""

from __future__ import annotations

import asyncio

import pytest

from scer_proxy.attribution.timeline import Share, Timeline, TimelineConfig
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
