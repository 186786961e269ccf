"""Ledger reads and the renders made of them run off the event loop, on threads of their own.

A read of the ledger (SQLite) and what is made of it (the JSON of 10,000 records, the Prometheus text of
many series, an SVG label with its QR code) take from a millisecond to a second; on the loop they would
stall every proxied request for as long. The endpoints take on the loop what only the loop may touch
(the records not yet written, the meters' state) and hand the rest to ``off_loop``. The threads are a
small pool of their own, not the default executor, so that a burst of slow reads never delays the
ledger's writer or the token counting, which run there.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from aiohttp import web

READ_THREADS = 2  # the ledger's two reading connections each serve one read at a time
READS = web.AppKey("reads", ThreadPoolExecutor)

T = TypeVar("T")


def install(app: web.Application) -> None:
    """Give ``app`` its read threads. Call it after the ledger's ``cleanup_ctx`` is added, so that at
    shutdown the reads still running end before the ledger closes."""

    # Threads start lazily, at the first read.
    pool = ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="scer-read")
    app[READS] = pool

    async def reads_ctx(app: web.Application) -> AsyncIterator[None]:
        yield
        await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(pool.shutdown, wait=True, cancel_futures=True)
        )

    app.cleanup_ctx.append(reads_ctx)


async def off_loop(app: web.Application, fn: Callable[..., T], /, *args: object) -> T:
    """``fn(*args)`` on one of ``app``'s read threads; the loop serves other requests meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(app[READS], functools.partial(fn, *args))
