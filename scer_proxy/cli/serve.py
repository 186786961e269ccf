"""``scer-proxy serve`` (the proxy) and ``scer-proxy simulate`` (the simulated GPU server): the
long-running commands, on uvloop, until a signal."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from scer_proxy import __version__
from scer_proxy.cli.errors import USAGE, CliError, command
from scer_proxy.config import Config, load_config, parse_listen

if TYPE_CHECKING:
    from scer_proxy.proxy.serving import GuardedRunner


def run_on_uvloop(coro: Coroutine[Any, Any, int]) -> int:
    """Run the coroutine on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we test
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def start_proxy(
    config: Config, host: str | None = None, port: int | None = None
) -> tuple[GuardedRunner, str]:
    """Start the proxy on its listen address (or the given one), its client connections bounded by the
    ``server`` keys; returns the runner (stop it with ``drain``) and the base URL."""
    from scer_proxy.app import create_app
    from scer_proxy.ledger.sqlite import LedgerError
    from scer_proxy.proxy.serving import ClientLimits, serve_app

    server = config.server
    limits = ClientLimits(
        header_timeout_s=server.header_timeout_s,
        keepalive_timeout_s=server.keepalive_timeout_s,
        max_connections=server.max_connections,
        shutdown_timeout_s=server.shutdown_timeout_s,
    )
    try:
        return await serve_app(
            create_app(config),
            host if host is not None else server.host,
            port if port is not None else server.port,
            limits=limits,
        )
    except LedgerError as exc:
        raise CliError(f"storage.path: {exc}", USAGE) from None


async def _serve(config: Config) -> int:
    import structlog

    from scer_proxy.proxy.serving import drain, tune_gc_for_serving, wait_for_signal

    log = structlog.get_logger("scer_proxy")
    runner, url = await start_proxy(config)
    frozen, young_threshold = tune_gc_for_serving()
    log.info(
        "listening",
        url=url,
        upstreams=[u.url for u in config.upstreams],
        meter=config.meter.kind,
        version=__version__,
        gc_frozen_objects=frozen,
        gc_young_threshold=young_threshold,
    )
    try:
        await wait_for_signal()
    finally:
        log.info("stopping", reason="signal", shutdown_timeout_s=config.server.shutdown_timeout_s)
        await drain(runner)
        log.info("stopped")
    return 0


# The flags that set a configuration key: (argparse dest, the flag, section, key).
FLAG_KEYS = (
    ("listen", "--listen", "server", "listen"),
    ("log_level", "--log-level", "server", "log_level"),
    ("meter", "--meter", "meter", "kind"),
    ("dcgm_url", "--dcgm-url", "meter", "dcgm_url"),
    ("db", "--db", "storage", "path"),
)


def _config_from(args: argparse.Namespace) -> Config:
    overrides: dict[str, dict[str, Any]] = {}
    flags: dict[str, str] = {}
    for dest, flag, section, key in FLAG_KEYS:
        value = getattr(args, dest)
        if value:
            overrides.setdefault(section, {})[key] = value
            flags[f"{section}.{key}"] = flag
    return load_config(
        args.config, environ=os.environ, overrides=overrides, upstream_url=args.upstream, flags=flags
    )


@command("serve")
def serve_command(args: argparse.Namespace) -> int:
    from scer_proxy.logs import configure_logging

    config = _config_from(args)
    configure_logging(config.server.log_level)
    # Ledger reads and renders run on worker threads; the loop waits for the GIL up to the switch
    # interval each time one holds it (5 ms by default). 1 ms halved the proxied p99 during reads.
    sys.setswitchinterval(0.001)
    return run_on_uvloop(_serve(config))


async def _simulate(args: argparse.Namespace) -> int:
    import structlog

    from scer_proxy.proxy.serving import wait_for_signal
    from scer_proxy.sim import get_profile, serve_simulator

    host, port = parse_listen(args.listen, "--listen")
    task = asyncio.create_task(
        serve_simulator(
            host,
            port,
            profile=get_profile(args.profile),
            time_scale=args.time_scale,
            seed=args.seed,
            metrics_period_ms=args.metrics_period_ms,
        )
    )
    waiter = asyncio.create_task(wait_for_signal())
    done, _pending = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    for pending in (task, waiter):
        pending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pending
    if task in done and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]
    structlog.get_logger("scer_proxy.sim").info("stopped")
    return 0


@command("simulate")
def simulate_command(args: argparse.Namespace) -> int:
    from scer_proxy.logs import configure_logging
    from scer_proxy.sim import get_profile, list_profiles

    if args.list_profiles:
        for name in list_profiles():
            print(name)
        return 0
    parse_listen(args.listen, "--listen")
    try:
        get_profile(args.profile)
    except (KeyError, ValueError):
        raise CliError(f"--profile: unknown profile {args.profile!r} (see --list-profiles)", USAGE) from None
    configure_logging("info")
    return run_on_uvloop(_simulate(args))
