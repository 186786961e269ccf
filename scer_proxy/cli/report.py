"""``scer-proxy report``: the summary from the ledger database, a running proxy or a Prometheus server that
scrapes many proxies, as a table, JSON or CSV.

The PromQL and the summary built from its answers are in ``scer_proxy.summary.promql`` (pure); this module
sends the queries (``GET /api/v1/query``) and turns transport and protocol failures into one line.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import os
import sys
import time
from typing import TYPE_CHECKING, Any

import orjson

from scer_proxy.cli.errors import (
    TIMEOUT_S,
    USAGE,
    CliError,
    command,
    file_not_found,
    get,
    http_status,
    one_line,
    proxy_at,
    request_failed,
)
from scer_proxy.cli.tables import (
    csv_cell,
    fmt_number,
    summary_rows,
    summary_table,
    terminal_json,
    terminal_text,
)
from scer_proxy.summary.build import parse_duration_s

if TYPE_CHECKING:
    import httpx

    from scer_proxy.summary.promql import Sample

_CSV_COLUMNS = (
    "model",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "energy_wh",
    "carbon_g",
    "carbon_g_per_1k_output_tokens",
    "grade",
)


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``report`` subcommand's flags (the CLI calls this on its subparser)."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--db", help="ledger database file (default: storage.path, scer.db)")
    source.add_argument("--proxy", help="base URL of a running proxy (reads /scer/summary)")
    source.add_argument(
        "--prometheus", help="base URL of a Prometheus server that scrapes the proxies' /metrics"
    )
    parser.add_argument("--since", help="window: 30m, 1h, 7d ... (default: all records kept)")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output format")
    parser.add_argument("--model", help="one model only")
    parser.add_argument("--tenant", help="one tenant only")
    parser.add_argument(
        "--token",
        default=os.environ.get("SCER_SERVER_ADMIN_TOKEN", ""),
        help="admin token of the proxy (--proxy; default $SCER_SERVER_ADMIN_TOKEN)",
    )


def render(summary: dict[str, Any], fmt: str) -> str:
    """The summary as ``table`` (aligned text), ``json`` (the summary object) or ``csv`` (one row a
    model and a total; energy in Wh, carbon in gCO2e, intensity per 1,000 output tokens). Every format
    is safe to print: names from the ledger never reach the terminal with a control character, and
    no CSV cell starts as a spreadsheet formula (``scer_proxy.cli.tables``)."""
    if fmt == "json":
        text = orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()
        return terminal_json(text) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(_CSV_COLUMNS)
        writer.writerows([csv_cell(v) for v in r] for r in summary_rows(summary))
        return out.getvalue()
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}")
    window = summary.get("window") or {}
    head = f"window: {fmt_number(window.get('start'))} .. {fmt_number(window.get('end'))} (Unix s)"
    notes = "".join(f"{line}\n" for line in began_notes(summary))
    return f"{head}\n{notes}{summary_table(summary)}\n"


def began_notes(summary: dict[str, Any]) -> list[str]:
    """One line per model whose Prometheus series began (or restarted) inside the window: increase()
    counts it from its first scrape only, so its figures may miss what it counted before."""
    return [
        terminal_text(
            f"note: a series of {entry['model']} began inside the window at {fmt_number(entry['began_at'])} "
            "(Unix s); counted from its first scrape"
        )
        for entry in summary.get("series_began") or []
    ]


def _from_db(path: str, since_s: float | None, model: str | None, tenant: str | None) -> dict[str, Any]:
    from scer_proxy.ledger.sqlite import LedgerError, SqliteLedger

    if not os.path.isfile(path):
        raise file_not_found(path, "--db")
    ledger = SqliteLedger(path, read_only=True)

    async def read() -> dict[str, Any]:
        await ledger.open()
        try:
            return await ledger.summary(since_s, model, tenant)
        finally:
            await ledger.close()

    try:
        return asyncio.run(read())
    except LedgerError as exc:
        raise CliError(f"--db: {exc}", USAGE) from None


def _from_proxy(
    url: str, since: str | None, model: str | None, tenant: str | None, token: str
) -> dict[str, Any]:
    params = {k: v for k, v in (("since", since), ("model", model), ("tenant", tenant)) if v}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    where = proxy_at(url)
    resp = get(
        url.rstrip("/") + "/scer/summary", where, "--proxy", (400, 401), params=params, headers=headers
    )
    try:
        data: dict[str, Any] = resp.json()
    except ValueError:
        raise CliError(f"{where}: /scer/summary did not answer JSON (is it a scer-proxy?)") from None
    return data


def _prometheus_query(client: httpx.Client, base: str, query: str, at: float) -> list[Sample]:
    """One instant query's samples; a CliError naming the server and the reason otherwise."""
    import httpx

    from scer_proxy.summary.promql import PrometheusError, vector

    where = f"Prometheus at {base}"
    try:
        resp = client.get(base + "/api/v1/query", params={"query": query, "time": f"{at:.3f}"})
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise request_failed(exc, where, "--prometheus") from None
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("status") == "error":
        raise CliError(
            f"{where}: HTTP {resp.status_code}: {body.get('errorType') or 'error'}: "
            f"{one_line(str(body.get('error') or 'no reason given'))} (query: {query})"
        )
    if resp.status_code != 200:
        raise http_status(resp, where)
    if body is None:
        kind = resp.headers.get("content-type", "no content type")
        raise CliError(f"{where}: the answer is not JSON ({kind}): {one_line(resp.text, 120)}")
    try:
        return vector(body)
    except PrometheusError as exc:
        raise CliError(f"{where}: {one_line(str(exc))} (query: {query})") from None


def _from_prometheus(
    url: str, since_s: float | None, model: str | None, tenant: str | None
) -> dict[str, Any]:
    """The summary summed over every proxy the Prometheus server at ``url`` scrapes."""
    import httpx

    from scer_proxy.summary import promql

    try:
        base = promql.check_url(url)
    except ValueError as exc:
        raise CliError(f"--prometheus: {exc}", USAGE) from None
    if since_s is not None:
        try:
            promql.duration(since_s)
        except ValueError as exc:
            raise CliError(f"--since: {exc}", USAGE) from None
    end = time.time()
    with httpx.Client(timeout=TIMEOUT_S) as client:
        if tenant is not None:
            for metric, probe in promql.tenant_probe_queries().items():
                if not _prometheus_query(client, base, probe, end):
                    raise CliError(
                        f"--tenant: {metric} on Prometheus at {base} carries no tenant label; "
                        "use --db or --proxy for one tenant",
                        USAGE,
                    )
        results = {
            name: _prometheus_query(client, base, query, end)
            for name, query in promql.summary_queries(since_s, model, tenant).items()
        }
    return promql.build_summary(results, start=None if since_s is None else end - since_s, end=end)


@command("report")
def main_report(args: argparse.Namespace) -> int:
    """Run ``scer-proxy report``: 0 printed, 2 bad usage, 1 a source that could not be read."""
    since_s = None
    if args.since:
        try:
            since_s = parse_duration_s(args.since)
        except ValueError as exc:
            raise CliError(f"--since: {exc}", USAGE) from None
    if args.prometheus is not None:
        summary = _from_prometheus(args.prometheus, since_s, args.model or None, args.tenant or None)
    elif args.proxy:
        summary = _from_proxy(args.proxy, args.since, args.model, args.tenant, args.token)
    else:
        summary = _from_db(args.db or "scer.db", since_s, args.model, args.tenant)
    sys.stdout.write(render(summary, args.format))
    return 0
