"""The meter runtime of one upstream (or of the upstreams sharing its boards): a sampler task feeding
readings into their attribution timeline.

The sampler reads the meter every ``interval_ms``; a failed read (a :class:`MeterError`, or a reading
with a non-finite value) is counted and shown in health, and never stops requests from being served
(their records are flagged ``meter_error`` until the meter answers again). When an interval settles
requests, ``on_settled`` receives their final shares.

The counter's energy is counted per device, from the first reading: a device's step backwards (a
driver reload, a GPU reset) counts zero, so only that device's interval is lost and no figure, the
timeline's or ``counter_j`` in health, ever goes negative (``counter_resets`` counts them). A device
missing from a reading adds nothing until it is back, when its step covers the gap.

Upstreams on one board (the same GPU index or UUID, MIG devices of one GPU) share one
:class:`UpstreamMeter`, built once in ``scer_proxy/app.py``: its timeline splits the board's energy
among all their requests by one rule, and ``shared_by`` names them.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from scer_proxy.attribution.readings import ValueClock
from scer_proxy.attribution.timeline import Share, Timeline
from scer_proxy.meters import Estimator, Meter, MeterError, Reading
from scer_proxy.meters.period import ChangeGaps

log = structlog.get_logger("scer_proxy.meter")
SETTLE_BATCH = 8  # settled records handed on between two turns of the event loop (about 0.1 ms of work)


class UpstreamMeter:
    """An upstream's energy figures: from its ``meter`` through the timeline, or from its ``estimator``
    where it has no meter (neither: no figures)."""

    def __init__(
        self,
        upstream: str,
        meter: Meter | None,
        timeline: Timeline,
        *,
        interval_s: float,
        on_settled: Callable[[str, Share], None],
        clock: Callable[[], float] = time.monotonic,
        estimator: Estimator | None = None,
        shared_by: tuple[str, ...] = (),
    ) -> None:
        if meter is not None and estimator is not None:
            raise ValueError("an upstream has a meter or an estimator, not both")
        self.upstream = upstream
        self.shared_by = shared_by or (upstream,)  # the upstreams whose requests this timeline splits
        self.meter = meter
        self.estimator = estimator
        self._source: Meter | Estimator | None = meter if meter is not None else estimator
        self.timeline = timeline
        self.interval_s = interval_s
        self._on_settled = on_settled
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self.first_reading: Reading | None = None
        self.last_reading: Reading | None = None
        self.errors = 0
        self.last_error: str | None = None
        self.healthy = self._source is not None
        self.readings = 0
        self._value_clock = ValueClock()
        self._gaps = ChangeGaps()
        self._device_j: dict[str, float] = {}  # each device's last value
        self.counter_j = 0.0  # the counter's energy since the first reading, per device, resets counting 0
        self.counter_resets = 0

    @property
    def update_period_s(self) -> float | None:
        """The counter's update period: the median gap between its changes as the sampler reads it
        (:mod:`.period`), else what the meter measured at open (NVML's probe), else None."""
        measured = self._gaps.period_s
        if measured is not None:
            return measured
        probed = getattr(self.meter, "update_period_s", None)
        return float(probed) if isinstance(probed, int | float) else None

    @property
    def source(self) -> str:
        return self._source.source if self._source is not None else "none"

    # -- the proxy's side ---------------------------------------------------------------------
    def start_request(self, rid: str, prompt_tokens: int, *, stream: bool) -> None:
        self.timeline.start(rid, self._clock(), prompt_tokens, stream=stream)

    def token_sink(self, rid: str) -> Callable[[int], None]:
        """A callable for the stream relay: ``sink(n)`` records n tokens passing now (cheap, per chunk)."""
        tokens, clock = self.timeline.tokens, self._clock

        def sink(count: int) -> None:
            tokens(rid, clock(), count)

        return sink

    def finish_request(
        self, rid: str, prompt_tokens: int, completion_tokens: int, *, model: str
    ) -> tuple[Share | None, float | None, tuple[str, ...]]:
        """Mark the end; returns the response-time figure (the split part plus the rest at the latest
        prices, or the estimator's figure), its relative uncertainty, and flags. None when there is no
        figure: a missing counter is never a zero."""
        now = self._clock()
        started = self.timeline.started_s(rid)
        started = now if started is None else started
        if self.estimator is not None:
            concurrency = float(self.timeline.active)
            self.timeline.forget(rid)
            estimate = self.estimator.estimate(
                model=model,
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                concurrency=concurrency,
                duration_s=now - started,
            )
            energy_j = estimate.prefill_j + estimate.decode_j
            share = Share(rid, energy_j, estimate.prefill_j, estimate.decode_j, estimate.hw_s, settled=True)
            return share, self.estimator.uncertainty_rel, estimate.flags
        self.timeline.finish(rid, now, prompt_tokens, completion_tokens)
        if self.meter is None or self.timeline.last_t_s is None:
            self.timeline.forget(rid)
            return None, None, ()
        figure = self.timeline.estimate(rid, now)
        return figure, self.stated_uncertainty(figure, now - started, settled=False), ()

    def void_request(self, rid: str) -> Share | None:
        """``rid`` used no GPU (an error answered before any token): it leaves the timeline with no energy
        (what was already split to it goes back to idle) and its figure is a real, settled zero. None
        where the upstream has neither meter nor estimator: no figure, not even a zero."""
        self.timeline.void(rid, self._clock())
        if self._source is None:
            return None
        return Share(rid, 0.0, 0.0, 0.0, 0.0, settled=True, idle_j=0.0, uncertainty_rel=0.0)

    def stated_uncertainty(self, share: Share | None, duration_s: float, *, settled: bool) -> float:
        """The bound the timeline states for ``share``, else the heuristic :meth:`uncertainty_rel`."""
        if share is not None and share.uncertainty_rel is not None:
            return share.uncertainty_rel
        return self.uncertainty_rel(duration_s, settled=settled)

    def uncertainty_rel(self, duration_s: float, *, settled: bool) -> float:
        """A stated bound on the relative error of a measured figure (a heuristic, see the README).

        Wider for requests shorter than the counter's update period, whose energy rests on a fraction of
        one reading, and wider before settlement (the tail is priced, not yet measured).
        """
        period = self.update_period_s or self.interval_s
        short = min(1.0, period / max(duration_s, 1e-6))
        return (0.05 if settled else 0.10) + (0.25 if settled else 0.40) * short

    # -- the sampler --------------------------------------------------------------------------
    async def sample_once(self) -> None:
        assert self.meter is not None
        try:
            reading = await self.meter.read()
            devices = _checked(reading)
        except MeterError as exc:
            self.errors += 1
            self.healthy = False
            if self.last_error != str(exc):
                log.warning("meter_error", upstream=self.upstream, error=str(exc))
            self.last_error = str(exc)
            return
        if not self.healthy and self.last_error is not None:
            log.info("meter_recovered", upstream=self.upstream)
        self.healthy = True
        self.readings += 1
        first = self.first_reading is None
        self.last_reading = reading
        if self.first_reading is None:
            self.first_reading = reading
        self._gaps.observe(reading.t_s, devices)
        changed = self._count(devices) or first
        value_s = self._value_clock.observe(reading.t_s, changed)
        if value_s is None:
            return  # the counter has not updated since the last read: no new interval yet
        result = self.timeline.reading(value_s, self.counter_j)
        if result is not None:
            await self._settle(result.settled)

    def _count(self, devices: Mapping[str, float]) -> bool:
        """Add each device's step since its last value to ``counter_j``; a step backwards is a reset and
        counts zero. Returns whether any device's value changed."""
        changed = False
        for device, value_j in devices.items():
            last_j = self._device_j.get(device)
            self._device_j[device] = value_j
            if last_j is None or value_j == last_j:
                continue
            changed = True
            if value_j > last_j:
                self.counter_j += value_j - last_j
                continue
            self.counter_resets += 1
            log.warning(
                "meter_counter_reset",
                upstream=self.upstream,
                device=device,
                previous_j=last_j,
                now_j=value_j,
                resets=self.counter_resets,
            )
        return changed

    async def _settle(self, shares: tuple[Share, ...]) -> None:
        """Hand the settled shares on, yielding to the loop every ``SETTLE_BATCH`` of them: one reading can
        settle hundreds of requests, and requests arriving meanwhile should not wait for all of them. A
        cancellation (shutdown) while yielding still hands on the rest: they are not derivable again."""
        for i, share in enumerate(shares):
            if i and i % SETTLE_BATCH == 0:
                try:
                    await asyncio.sleep(0)
                except asyncio.CancelledError:
                    for rest in shares[i:]:
                        self._on_settled(self.upstream, rest)
                    raise
            self._on_settled(self.upstream, share)

    async def _run(self) -> None:
        while True:
            started = self._clock()
            await self.sample_once()
            delay_s = max(0.0, self.interval_s - (self._clock() - started))
            wake_s = self._clock() + delay_s
            await asyncio.sleep(delay_s)
            self.timeline.note_timing(self._clock() - wake_s)  # how late the loop ran the timer

    @property
    def samples(self) -> bool:
        """Whether there is a counter to sample."""
        return self.meter is not None

    def start(self) -> None:
        if self.samples and self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"meter-{self.upstream}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.meter is not None:
            await self.meter.close()

    def idle_state(self) -> dict[str, float | None]:
        """The timeline's idle figures now, GPU joules before PUE: reported apart (``separate_j``), waiting
        to be spread (``balance_j``), spread to requests so far (``spread_j``); ``ratio``, the idle-to-active
        energy ratio of the window now (None before any active energy, and under ``separate``); and
        ``active_j``, the prefill and decode energy split to requests so far (to weigh ratios by)."""
        timeline = self.timeline
        spread = timeline.idle
        active_j = max(0.0, timeline.measured_j - timeline.idle_j - spread.accrued_j)
        return {
            "separate_j": timeline.idle_j,
            "balance_j": timeline.idle_balance_j,
            "spread_j": spread.spread_j,
            "ratio": spread.ratio(self._clock()),
            "active_j": active_j,
        }

    def describe(self) -> dict[str, Any]:
        period_s = self.update_period_s
        age_ms = None
        if self.last_reading is not None:
            age_ms = (self._clock() - self.last_reading.t_s) * 1000.0
        info = self._source.describe() if self._source is not None else {"kind": "none", "devices": []}
        extra = {k: v for k, v in info.items() if k not in ("kind", "devices", "url")}
        return {
            **extra,
            "upstream": self.upstream,
            "shared_by": list(self.shared_by),
            "kind": self.source,
            "devices": info.get("devices", []),
            "url": info.get("url"),
            "update_period_ms": None if period_s is None else period_s * 1000.0,
            "interval_ms": self.interval_s * 1000.0,
            "last_reading_age_ms": age_ms,
            "healthy": self.healthy,
            "errors": self.errors,
            "last_error": self.last_error,
            "pending_requests": self.timeline.pending(),
            "deferred_intervals": self.timeline.deferred_intervals,
            "timing_noise_ms": self.timeline.state.timing_noise_s * 1000.0,
            "prefill_j_per_token": self.timeline.calibrated_prefill_j_per_token(),
            # What the timeline has learned, with how many observations each figure rests on.
            "learned": self.timeline.learned.describe()
            | {
                "idle_ratio": self.timeline.idle.ratio(self._clock()),
                "idle_balance_j": self.timeline.idle_balance_j,
            },
            # GPU energy before PUE since the first reading: split among intervals, and the counter's
            # own steps (a reset counts zero, so neither is ever negative).
            "measured_j": self.timeline.measured_j,
            "counter_j": None if self.first_reading is None else self.counter_j,
            "counter_resets": self.counter_resets,
        }


def _checked(reading: Reading) -> dict[str, float]:
    """The reading's per-device values (its total as one device when it has none); a non-finite value is a
    :class:`MeterError`, never a figure."""
    devices = dict(reading.devices_j) or {"": reading.energy_j}
    bad = sorted(k for k, v in devices.items() if not math.isfinite(v))
    if bad or not math.isfinite(reading.energy_j):
        raise MeterError(f"the reading holds a non-finite value (devices {bad or 'total'})")
    return devices


def distinct_meters(meters: dict[str, UpstreamMeter]) -> dict[str, UpstreamMeter]:
    """One entry per meter runtime (upstreams that share a board map to one), under its first upstream's
    name: what sums over upstreams (idle, errors) must count once."""
    seen: dict[int, str] = {}
    out: dict[str, UpstreamMeter] = {}
    for name, meter in meters.items():
        if id(meter) not in seen:
            seen[id(meter)] = name
            out[name] = meter
    return out
