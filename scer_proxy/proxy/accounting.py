"""Accounting: from what the proxy observed of a request to its record in the ledger.

One direction of flow: the handler opens a record, reports the first token and the end with the token
counts; the upstream's meter runtime gives the response-time figure (settled part plus estimated
tail); carbon is computed from it; the record goes to the ledger. When the meter's next reading
settles the request, the record is replaced by its final figure (``settled: true``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

from scer_proxy.attribution.timeline import Share
from scer_proxy.carbon.records import Record, energy_fields, functional_units
from scer_proxy.carbon.sci import Embodied
from scer_proxy.config import Config
from scer_proxy.grid.providers import GridIntensitySource
from scer_proxy.ledger.sqlite import SqliteLedger
from scer_proxy.meters.sampler import UpstreamMeter
from scer_proxy.proxy.upstreams import Upstreams
from scer_proxy.wire import tokens

_TENANT_HEADER = re.compile(r"^[A-Za-z0-9._:@/+-]{1,128}$")
ESTIMATED_FROM_BYTES = "prompt_estimated_from_bytes"


def used_no_gpu(
    *, status: str, http_status: int | None, completion_tokens: int, reached_upstream: bool
) -> bool:
    """Whether a finished request used no GPU, so that its energy is a real zero.

    An error answered before any token: the upstream refused it (``upstream_error``, any status >= 400,
    an unknown model's 404 among them; servers check a request before they schedule it), or the proxy
    answered it (502/504) without the request ever reaching the upstream (no connection). Not an answer
    with a token, not a success, not a cancellation (the prompt was sent: it may have been prefilled),
    not a proxy error after the request was sent (a read timeout, a broken answer: it may have run).
    """
    if completion_tokens > 0 or http_status is None or http_status < 400:
        return False
    return status == "upstream_error" or not reached_upstream


class PromptCount:
    """A request's prompt tokens, counted without ever tokenizing on the event loop.

    Tokenizing is CPU work (cl100k takes about a second a MB), so a prompt is counted here only when
    it is short; a longer one is counted in a worker thread from the start of the request (tiktoken
    releases the GIL), and one over :data:`tokens.PROMPT_TOKENIZE_MAX_BYTES` is not tokenized at all:
    its count is estimated from its size, flagged ``prompt_estimated_from_bytes`` with ``estimate``
    as the token source (:func:`tokens.prompt_plan`). The upstream's own ``/tokenize`` count, where
    it was asked, replaces all of these.

    Reading the count (:meth:`result`) never waits: before the thread has finished it is the size
    estimate, so a record's closing path awaits :meth:`wait` first.
    """

    def __init__(self, kind: str, body: dict[str, Any]) -> None:
        self.kind = kind
        self.body = body
        self._future: asyncio.Future[int] | None = None
        self._read = False  # the record took its count: a later one must not change the timeline
        how, self._count = tokens.prompt_plan(kind, body)
        self._estimated = how == "estimate"
        # Where the request's prefill goes on the timeline until the usage (or the count) arrives.
        self.first = self._count
        if how == "inline":
            self._count = self.first = tokens.count_prompt(kind, body)
        elif how == "thread":
            self.first = tokens.estimate_prompt(kind, body)
            self._future = asyncio.get_running_loop().run_in_executor(None, tokens.count_prompt, kind, body)

    def when_counted(self, callback: Callable[[int], None]) -> None:
        """Call ``callback`` with the thread's count if it arrives before the record is closed."""

        def counted(done: asyncio.Future[int]) -> None:
            if not self._read and not done.cancelled() and done.exception() is None:
                callback(done.result())

        if self._future is not None:
            self._future.add_done_callback(counted)

    async def wait(self) -> None:
        """Until the thread's count is there (at most the cap's worth of tokenizing, a tenth of a second).

        Shielded: a cancellation of the caller leaves the thread's future alone (it cannot be stopped).
        """
        if self._future is not None and not self._future.done():
            await asyncio.shield(self._future)

    async def ask_upstream(self, upstreams: Upstreams, name: str) -> None:
        """Count the prompt with the upstream's ``/tokenize`` where it can (a stream cut short: the
        completion is counted there too), else wait for the local count."""
        counted = await upstreams.tokenize_prompt(name, self.kind, self.body)
        if counted is not None:
            self._count, self._estimated, self._future = counted, False, None
        else:
            await self.wait()

    def result(self) -> tuple[int, str, tuple[str, ...]]:
        """The count, its token source (``tokenizer`` or ``estimate``) and the record's flags for it."""
        self._read = True
        future = self._future
        if future is not None and future.done() and not future.cancelled() and future.exception() is None:
            return future.result(), "tokenizer", ()
        if self._estimated or future is not None:
            return self._count, "estimate", (ESTIMATED_FROM_BYTES,)
        return self._count, "tokenizer", ()


async def count_text_off_loop(text: str) -> int:
    """cl100k's count of a text (a completion the upstream sent no usage for), in a worker thread
    unless it is short: a few MB take seconds, which on the event loop would hold every request up."""
    if len(text) <= tokens.PROMPT_INLINE_MAX_BYTES:
        return tokens.count_text(text)
    return await asyncio.get_running_loop().run_in_executor(None, tokens.count_text, text)


def new_request_id() -> str:
    """``scer-`` and 32 hex digits: the Unix time in milliseconds (12 digits), then 80 random bits.

    Time first, as in a UUIDv7: ids made together sort together, so the ledger's index on them grows at
    its right-hand edge instead of touching a random page of it for every record (fewer pages written a
    flush, and fewer read back once the index outgrows SQLite's page cache)."""
    return f"scer-{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


class Accounting:
    def __init__(
        self,
        config: Config,
        ledger: SqliteLedger,
        meters: Mapping[str, UpstreamMeter],
        grid: GridIntensitySource,
        *,
        tenant_salt: bytes | None = None,
        wall_clock: Callable[[], float] = time.time,
        rating_for: Callable[[str], str] = lambda model: "unrated",
    ) -> None:
        self.rating_for = rating_for
        self.config = config
        self.ledger = ledger
        self.meters = meters
        self.grid = grid
        self._salt = tenant_salt if tenant_salt is not None else secrets.token_bytes(16)
        self._wall = wall_clock
        self._pending: dict[str, Record] = {}
        self._embodied = {
            u.name: Embodied(
                gpu_kg=config.embodied.gpu_kg,
                server_kg=config.embodied.server_kg,
                gpus_per_server=config.embodied.gpus_per_server,
                lifetime_years=config.embodied.lifetime_years,
                gpus_used=max(1, len(u.gpus)),
            )
            for u in config.upstreams
        }

    def embodied_for(self, upstream: str) -> Embodied:
        return self._embodied[upstream]

    def tenant(self, headers: Mapping[str, str]) -> str:
        """``X-SCER-Tenant`` when given (validated), else a salted hash of the API key, never the key."""
        named = headers.get("X-SCER-Tenant", "").strip()
        if named and _TENANT_HEADER.match(named):
            return named
        auth = headers.get("Authorization", "")
        key = auth[7:].strip() if auth[:7].lower() == "bearer " else auth.strip()
        if not key:
            return "anonymous"
        return "key-" + hashlib.sha256(self._salt + key.encode("utf-8", "replace")).hexdigest()[:16]

    def open(
        self, *, upstream: str, model: str, tenant: str, endpoint: str, stream: bool, prompt_estimate: int
    ) -> Record:
        record = Record(
            request_id=new_request_id(),
            model=model,
            upstream=upstream,
            tenant=tenant,
            endpoint=endpoint,
            stream=stream,
            started_at=self._wall(),
            rating=self.rating_for(model),
        )
        self.meters[upstream].start_request(record.request_id, prompt_estimate, stream=stream)
        return record

    def prompt_counted(self, record: Record, prompt_tokens: int) -> None:
        """The exact prompt count arrived (counted off the request path): refine the timeline."""
        self.meters[record.upstream].timeline.set_prompt(record.request_id, prompt_tokens)

    def token_sink(self, record: Record) -> Callable[[int], None]:
        """Where the stream relay reports the tokens it passes on (one call a chunk)."""
        return self.meters[record.upstream].token_sink(record.request_id)

    def close(
        self,
        record: Record,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        token_source: str,
        status: str,
        http_status: int | None,
        flags: tuple[str, ...] = (),
        reached_upstream: bool = True,
    ) -> Record:
        """Finish a record with the response-time figures and put it in the ledger; never waits.

        A request that used no GPU (:func:`used_no_gpu`) leaves the timeline with a settled zero, flagged
        ``no_gpu_work``: no energy, no operational or embodied carbon (it took no hardware time)."""
        meter = self.meters[record.upstream]
        void = used_no_gpu(
            status=status,
            http_status=http_status,
            completion_tokens=completion_tokens,
            reached_upstream=reached_upstream,
        )
        uncertainty: float | None
        if void:
            share = meter.void_request(record.request_id)
            uncertainty = None if share is None else share.uncertainty_rel
            meter_flags: tuple[str, ...] = ("no_gpu_work",)
        else:
            share, uncertainty, meter_flags = meter.finish_request(
                record.request_id, prompt_tokens, completion_tokens, model=record.model
            )
        grid = self.grid.current()  # O(1), no I/O: the cached live value, else the table
        flags = (*flags, *meter_flags, *grid.flags)
        if not meter.healthy and meter.meter is not None and not void:
            flags = (*flags, "meter_error")
        ended_at = self._wall()
        changes: dict[str, Any] = {
            "ended_at": ended_at,
            "status": status,
            "http_status": http_status,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "token_source": token_source,
            "flags": flags,
            "energy_uncertainty_rel": uncertainty,
            "grid_age_s": grid.age_s(ended_at),
        }
        if share is None:
            done = record.evolve(
                **changes,
                energy_source="none",
                grid_intensity_g_per_kwh=grid.intensity_g_per_kwh,
                grid_source=grid.source,
            )
        else:
            units = functional_units(record.endpoint, prompt_tokens, completion_tokens)
            energy = self._energy(record.upstream, share, units, grid.intensity_g_per_kwh, grid.source)
            if void:
                energy["sci"] = 0.0  # nothing emitted: zero per unit, even with no unit produced
            done = record.evolve(**changes, **energy)
            if not share.settled:
                self._pending[done.request_id] = done
                if len(self._pending) > self.config.storage.max_pending:
                    self._settle_oldest_as_is()
        self.ledger.put(done)
        return done

    def _settle_oldest_as_is(self) -> None:
        """More records wait for the reading that settles them than ``storage.max_pending`` (the meter has
        been down a while): the oldest is final with its response-time figure, flagged ``meter_outage``,
        and leaves the timeline, so memory stays bounded and no later reading counts it twice."""
        record = self._pending.pop(next(iter(self._pending)))
        self.meters[record.upstream].timeline.forget(record.request_id)
        self.ledger.put(record.evolve(settled=True, flags=(*record.flags, "meter_outage")))

    def _energy(
        self, upstream: str, share: Share, units: int, intensity_g_per_kwh: float, grid_source: str
    ) -> dict[str, Any]:
        return energy_fields(
            share,
            source=self.meters[upstream].source,
            pue=self.config.carbon.pue,
            intensity_g_per_kwh=intensity_g_per_kwh,
            grid_source=grid_source,
            embodied=self._embodied[upstream],
            units=units,
        )

    def settled(self, upstream: str, share: Share) -> None:
        """The meter's reading after a request's end has arrived: replace the record with the final figure."""
        record = self._pending.pop(share.rid, None)
        if record is None:
            return
        upstream = record.upstream  # its own: upstreams that share a board share one meter
        meter = self.meters[upstream]
        duration_s = (record.ended_at or record.started_at) - record.started_at
        # Settle with the intensity that applied when the request ended, not today's.
        intensity = record.grid_intensity_g_per_kwh if record.grid_intensity_g_per_kwh is not None else 0.0
        self.ledger.put(
            record.evolve(
                **self._energy(upstream, share, record.functional_units, intensity, record.grid_source),
                energy_uncertainty_rel=meter.stated_uncertainty(share, duration_s, settled=True),
            )
        )

    @property
    def pending(self) -> int:
        return len(self._pending)
