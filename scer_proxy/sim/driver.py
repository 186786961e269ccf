"""The asyncio task that moves the engine forward in step with the clock.

It sleeps until the end of the engine's current phase (converted to wall time by the time scale),
advances the engine, and repeats; when the engine is idle it waits to be kicked by a submit. The
wall-clock sleep is at least ``min_sleep_s``: at large time scales several steps are simulated per
wake-up, which changes nothing in the simulated timeline (it is exact whatever the wake-ups), only
how the tokens are bunched on the wire.
"""

from __future__ import annotations

import asyncio

from scer_proxy.sim.engine import Engine

DEFAULT_MIN_SLEEP_S = 0.001


class EngineDriver:
    def __init__(self, engine: Engine, *, min_sleep_s: float = DEFAULT_MIN_SLEEP_S) -> None:
        self.engine = engine
        self.min_sleep_s = min_sleep_s
        self._wake = asyncio.Event()

    def kick(self) -> None:
        """Wake the driver (after a submit to an idle engine)."""
        self._wake.set()

    async def run(self) -> None:
        engine = self.engine
        while True:
            now_s = engine.sync()
            next_s = engine.next_event_s()
            if next_s is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            delay_s = max(engine.real_delay_s(next_s - now_s), self.min_sleep_s)
            await asyncio.sleep(delay_s)
