"""The ``scer-proxy`` command: argument parsing and process setup (uvloop, logging, signals).

Exit codes: 0 success, 2 bad usage or configuration (one line naming the key or flag), 1 anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, NoReturn

from aiohttp import web

from scer_proxy import __version__
from scer_proxy.config import Config, ConfigError, load_config, parse_listen
from scer_proxy.ledger.sqlite import LedgerError
from scer_proxy.proxy.serving import tune_gc_for_serving, wait_for_signal


class UsageError(Exception):
    """Bad usage of the command line: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run the coroutine on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we test
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def start_proxy(
    config: Config, host: str | None = None, port: int | None = None
) -> tuple[web.AppRunner, str]:
    """Start the proxy on its listen address (or the given one); returns the runner and the base URL."""
    from scer_proxy.app import create_app
    from scer_proxy.proxy.serving import serve_app

    return await serve_app(
        create_app(config),
        host if host is not None else config.server.host,
        port if port is not None else config.server.port,
    )


async def _serve(config: Config) -> int:
    import structlog

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
        log.info("stopping", reason="signal")
        await runner.cleanup()
    return 0


async def _simulate(args: argparse.Namespace) -> int:
    import structlog

    from scer_proxy.sim import get_profile, serve_simulator

    host, port = parse_listen(args.listen, "--listen")
    profile = get_profile(args.profile)
    task = asyncio.create_task(
        serve_simulator(
            host,
            port,
            profile=profile,
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


def _config_from(args: argparse.Namespace) -> Config:
    overrides: dict[str, dict[str, Any]] = {}
    if args.listen:
        overrides.setdefault("server", {})["listen"] = args.listen
    if args.log_level:
        overrides.setdefault("server", {})["log_level"] = args.log_level
    if args.meter:
        overrides.setdefault("meter", {})["kind"] = args.meter
    if args.dcgm_url:
        overrides.setdefault("meter", {})["dcgm_url"] = args.dcgm_url
    if args.db:
        overrides.setdefault("storage", {})["path"] = args.db
    return load_config(args.config, environ=os.environ, overrides=overrides, upstream_url=args.upstream)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="scer-proxy", description="Per-request energy and carbon for OpenAI-compatible LLM servers."
    )
    parser.add_argument("--version", action="version", version=f"scer-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="TOML configuration file")
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:8080)")
    serve.add_argument("--upstream", help="one catch-all upstream URL (replaces [[upstreams]])")
    serve.add_argument("--meter", help="auto | nvml | dcgm | rapl | estimate | simulated")
    serve.add_argument("--dcgm-url", help="Prometheus endpoint of a DCGM exporter (with --meter dcgm)")
    serve.add_argument("--db", help="ledger database file")
    serve.add_argument("--log-level", help="debug | info | warning | error")

    simulate = sub.add_parser("simulate", help="run the built-in simulated GPU inference server")
    simulate.add_argument("--listen", default="127.0.0.1:8000", help="HOST:PORT (default 127.0.0.1:8000)")
    simulate.add_argument(
        "--profile", default="llama-3.1-8b-h100", help="simulator profile (see --list-profiles)"
    )
    simulate.add_argument("--list-profiles", action="store_true", help="print the profile names and exit")
    simulate.add_argument(
        "--time-scale", type=_positive_float, default=1.0, help="simulated seconds per real second"
    )
    simulate.add_argument("--seed", type=int, default=0, help="seed of the generated text")
    simulate.add_argument(
        "--metrics-period-ms",
        type=_positive_float,
        default=100.0,
        help="update period of the DCGM-style counter, simulated ms (default 100)",
    )

    bench = sub.add_parser("bench", help="run the standard benchmark through a running proxy")
    bench.add_argument("--target", required=True, help="the proxy's base URL, e.g. http://127.0.0.1:8080")
    bench.add_argument("--model", required=True, help="the model to benchmark, as the upstream names it")
    bench.add_argument(
        "--workload", default="standard-chat-v1", help="workload id (default standard-chat-v1)"
    )
    bench.add_argument(
        "--concurrency", type=_positive_int, help="concurrent requests (default: the workload's, 32)"
    )
    bench.add_argument(
        "--requests", type=_positive_int, help="requests per repeat (default: every prompt, 300)"
    )
    bench.add_argument(
        "--repeats", type=_positive_int, default=3, help="measured repeats, at least 3 (default 3)"
    )
    bench.add_argument("--task", default="chat", help="the category's task (default chat)")
    bench.add_argument(
        "--params-b", type=_positive_float, help="model parameters in billions, for the size class"
    )
    bench.add_argument("--out", help="submission file (default scer-submission-<model>.json)")
    bench.add_argument(
        "--no-submit", action="store_true", help="do not register the submission with the proxy"
    )

    rate = sub.add_parser("rate", help="rate bench submissions per SCER and print the table")
    rate.add_argument("files", nargs="+", metavar="FILE", help="submission files written by scer-proxy bench")
    rate.add_argument(
        "--quintiles",
        action="store_true",
        help="an A to E quintile scale instead of SCER's A to C (not the default)",
    )

    report = sub.add_parser("report", help="print the summary from the ledger database or a running proxy")
    from scer_proxy.cli.report import add_report_arguments

    add_report_arguments(report)

    label = sub.add_parser("label", help="write the SCER label (SVG) of a model, and its manifest")
    label.add_argument("--model", required=True, help="the model, as the upstream names it")
    source = label.add_mutually_exclusive_group(required=True)
    source.add_argument("--proxy", help="a running proxy's base URL: the label it serves")
    source.add_argument("--submission", help="a bench submission file")
    label.add_argument(
        "--out", required=True, help="the SVG file to write (the manifest goes beside it, .yaml)"
    )
    label.add_argument(
        "--base-url",
        default="http://127.0.0.1:8080",
        help="with --submission: the proxy URL the QR code links to (default http://127.0.0.1:8080)",
    )

    demo = sub.add_parser("demo", help="simulator + proxy + a short workload, then the summary")
    demo.add_argument("--once", action="store_true", help="exit after printing the summary")
    demo.add_argument(
        "--requests", type=_positive_int, default=48, help="requests in the workload (default 48)"
    )
    demo.add_argument("--concurrency", type=_positive_int, default=8, help="concurrent clients (default 8)")
    demo.add_argument(
        "--time-scale",
        type=_positive_float,
        default=20.0,
        help="simulated seconds per real second (default 20)",
    )
    demo.add_argument("--listen", default="127.0.0.1:0", help="proxy HOST:PORT (default: a free port)")
    return parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    from scer_proxy.logs import configure_logging

    try:
        args = build_parser().parse_args(argv)
        if args.command == "serve":
            config = _config_from(args)
            configure_logging(config.server.log_level)
            return _run(_serve(config))
        if args.command == "simulate":
            from scer_proxy.sim import get_profile, list_profiles

            if args.list_profiles:
                for name in list_profiles():
                    print(name)
                return 0
            parse_listen(args.listen, "--listen")
            try:
                get_profile(args.profile)
            except (KeyError, ValueError):
                raise UsageError(
                    f"scer-proxy simulate: --profile: unknown profile {args.profile!r} (see --list-profiles)"
                ) from None
            configure_logging("info")
            return _run(_simulate(args))
        if args.command == "bench":
            from scer_proxy.cli.commands import bench_command

            configure_logging("warning", json=False)
            return bench_command(args)
        if args.command == "rate":
            from scer_proxy.cli.commands import rate_command

            return rate_command(args)
        if args.command == "report":
            from scer_proxy.cli.report import main_report

            return main_report(args)
        if args.command == "label":
            from scer_proxy.cli.commands import label_command

            return label_command(args)
        if args.command == "demo":
            from scer_proxy.cli.demo import run_demo

            configure_logging("warning", json=False)
            return _run(run_demo(args))
    except LedgerError as exc:
        print(f"scer-proxy: storage.path: {exc}", file=sys.stderr)
        return 2
    except (UsageError, ConfigError) as exc:
        text = str(exc)
        print(text if text.startswith("scer-proxy") else f"scer-proxy: {text}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"scer-proxy: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2
