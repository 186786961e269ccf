"""The ``scer-proxy`` command line: the parser, and the dispatch to one module a command.

Exit codes: 0 success, 2 bad usage or configuration, 1 a failure at run time; every failure is one line
on stderr (see ``scer_proxy.cli.errors``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import NoReturn

from scer_proxy import __version__
from scer_proxy.cli.errors import USAGE, CliError, Command, print_error


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise CliError(f"{self.prog}: {message}", USAGE)


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

    health = sub.add_parser("health", help="ask a running proxy's /scer/health (exit 0 when it answers)")
    health.add_argument("--config", help="TOML configuration file: where the proxy listens, its admin token")
    health.add_argument("--url", help="the proxy's base URL (default: from server.listen)")

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
    bench.add_argument(
        "--token",
        default=os.environ.get("SCER_SERVER_ADMIN_TOKEN", ""),
        help="the proxy's admin token, for /scer/* (default $SCER_SERVER_ADMIN_TOKEN)",
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
    label.add_argument(
        "--from",
        dest="figures_from",
        choices=("traffic", "benchmark"),
        default="traffic",
        help="with --proxy: the label of live traffic (default) or of the model's bench submission",
    )
    label.add_argument(
        "--token",
        default=os.environ.get("SCER_SERVER_ADMIN_TOKEN", ""),
        help="with --proxy: the admin token, when labels are not public (default $SCER_SERVER_ADMIN_TOKEN)",
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


def _command(name: str) -> Command:
    """The function of a command, imported only when it runs (``demo`` and ``bench`` pull in openai)."""
    if name in ("serve", "simulate"):
        from scer_proxy.cli import serve

        return serve.serve_command if name == "serve" else serve.simulate_command
    if name == "health":
        from scer_proxy.cli.health import health_command

        return health_command
    if name == "bench":
        from scer_proxy.cli.bench import bench_command

        return bench_command
    if name == "rate":
        from scer_proxy.cli.rate import rate_command

        return rate_command
    if name == "label":
        from scer_proxy.cli.label import label_command

        return label_command
    if name == "report":
        from scer_proxy.cli.report import main_report

        return main_report
    from scer_proxy.cli.demo import demo_command

    return demo_command


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except CliError as exc:
        print_error(exc.message)
        return exc.exit_code
    try:
        return _command(args.command)(args)
    except KeyboardInterrupt:
        return 130
