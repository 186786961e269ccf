"""``scer-proxy report``: the summary from the ledger database, a running proxy or a Prometheus server that
scrapes many proxies, as a table, JSON or CSV.

The PromQL and the summary built from its answers are in ``scer_proxy.promql`` (pure); this module sends the
queries (``GET /api/v1/query``) and turns transport and protocol failures into one line.
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

from scer_proxy.summary.build import parse_duration_s

if TYPE_CHECKING:
    import httpx

    from scer_proxy.summary.promql import Sample

_COLUMNS = (
    "model",
    "requests",
    "prompt tokens",
    "completion tokens",
    "Wh",
    "gCO2e",
    "gCO2e per 1,000 output tokens",
    "grade",
)
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


def _rows(summary: dict[str, Any]) -> list[tuple[Any, ...]]:
    """One row a model, then the total: model, requests, tokens, Wh, gCO2e, gCO2e per 1,000 output, grade."""

    def row(name: str, t: dict[str, Any], grade: str) -> tuple[Any, ...]:
        energy_j, carbon_g = t.get("energy_j"), t.get("carbon_g")
        return (
            name,
            t["requests"],
            t["prompt_tokens"],
            t["completion_tokens"],
            None if energy_j is None else energy_j / 3600.0,
            carbon_g,
            t.get("sci"),
            grade,
        )

    rows = [row(m["model"], m, m.get("grade", "unrated")) for m in summary.get("models", [])]
    rows.append(row("total", summary["totals"], ""))
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render(summary: dict[str, Any], fmt: str) -> str:
    """The summary as ``table`` (aligned text), ``json`` (the summary object) or ``csv`` (one row a
    model and a total; energy in Wh, carbon in gCO2e, intensity per 1,000 output tokens)."""
    if fmt == "json":
        return orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n"
    rows = _rows(summary)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(_CSV_COLUMNS)
        writer.writerows(["" if v is None else v for v in r] for r in rows)
        return out.getvalue()
    if fmt != "table":
        raise ValueError(f"unknown format {fmt!r}")
    cells = [list(_COLUMNS)] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]

    def line(c: list[str]) -> str:
        return "  ".join(
            v.ljust(w) if i in (0, 7) else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths, strict=True))
        )

    window = summary.get("window") or {}
    head = f"window: {_fmt(window.get('start'))} .. {_fmt(window.get('end'))} (Unix s)"
    rule = "-" * len(line(cells[0]))
    return (
        "\n".join([head, line(cells[0]), rule, *(line(c) for c in cells[1:-1]), rule, line(cells[-1])]) + "\n"
    )


class _Usage(Exception):
    pass


class _Failed(Exception):
    """A source that could not be read (exit 1); the message is the line to print."""


def _from_db(path: str, since_s: float | None, model: str | None, tenant: str | None) -> dict[str, Any]:
    from scer_proxy.ledger.sqlite import LedgerError, SqliteLedger

    if not os.path.isfile(path):
        raise _Usage(f"--db: no such file: {path}")
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
        raise _Usage(f"--db: {exc}") from None


def _from_proxy(
    url: str, since: str | None, model: str | None, tenant: str | None, token: str
) -> dict[str, Any]:
    import httpx

    params = {k: v for k, v in (("since", since), ("model", model), ("tenant", tenant)) if v}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = httpx.get(url.rstrip("/") + "/scer/summary", params=params, headers=headers, timeout=30.0)
    if resp.status_code in (400, 401):
        raise _Usage(f"--proxy: {resp.status_code} {resp.text.strip()[:200]}")
    resp.raise_for_status()
    data: dict[str, Any] = resp.json()
    return data


_TIMEOUT_S = 30.0


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


def _prometheus_query(client: httpx.Client, base: str, query: str, at: float) -> list[Sample]:
    """One instant query's samples; _Failed naming the server and the reason otherwise."""
    import httpx

    from scer_proxy.summary.promql import PrometheusError, vector

    where = f"Prometheus at {base}"
    try:
        resp = client.get(base + "/api/v1/query", params={"query": query, "time": f"{at:.3f}"})
    except httpx.InvalidURL as exc:
        raise _Usage(f"--prometheus: {_one_line(str(exc))}") from None
    except httpx.TimeoutException:
        raise _Failed(f"{where}: no answer within {_TIMEOUT_S:g} s") from None
    except httpx.HTTPError as exc:
        raise _Failed(f"{where}: unreachable ({type(exc).__name__}: {_one_line(str(exc))})") from None
    try:
        body = resp.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("status") == "error":
        raise _Failed(
            f"{where}: HTTP {resp.status_code}: {body.get('errorType') or 'error'}: "
            f"{_one_line(str(body.get('error') or 'no reason given'))} (query: {query})"
        )
    if resp.status_code != 200:
        raise _Failed(f"{where}: HTTP {resp.status_code} {resp.reason_phrase}: {_one_line(resp.text, 200)}")
    if body is None:
        kind = resp.headers.get("content-type", "no content type")
        raise _Failed(f"{where}: the answer is not JSON ({kind}): {_one_line(resp.text, 120)}")
    try:
        return vector(body)
    except PrometheusError as exc:
        raise _Failed(f"{where}: {_one_line(str(exc))} (query: {query})") from None


def _from_prometheus(
    url: str, since_s: float | None, model: str | None, tenant: str | None
) -> dict[str, Any]:
    """The summary summed over every proxy the Prometheus server at ``url`` scrapes."""
    import httpx

    from scer_proxy.summary import promql

    try:
        base = promql.check_url(url)
    except ValueError as exc:
        raise _Usage(f"--prometheus: {exc}") from None
    if since_s is not None:
        try:
            promql.duration(since_s)
        except ValueError as exc:
            raise _Usage(f"--since: {exc}") from None
    end = time.time()
    with httpx.Client(timeout=_TIMEOUT_S) as client:
        if tenant is not None:
            for metric, probe in promql.tenant_probe_queries().items():
                if not _prometheus_query(client, base, probe, end):
                    raise _Usage(
                        f"--tenant: {metric} on Prometheus at {base} carries no tenant label; "
                        "use --db or --proxy for one tenant"
                    )
        results = {
            name: _prometheus_query(client, base, query, end)
            for name, query in promql.summary_queries(since_s, model, tenant).items()
        }
    return promql.build_summary(results, start=None if since_s is None else end - since_s, end=end)


def main_report(args: argparse.Namespace) -> int:
    """Run ``scer-proxy report``: 0 printed, 2 bad usage (one line on stderr), 1 anything else."""
    try:
        since_s = None
        if args.since:
            try:
                since_s = parse_duration_s(args.since)
            except ValueError as exc:
                raise _Usage(f"--since: {exc}") from None
        if args.prometheus is not None:
            summary = _from_prometheus(args.prometheus, since_s, args.model or None, args.tenant or None)
        elif args.proxy:
            summary = _from_proxy(args.proxy, args.since, args.model, args.tenant, args.token)
        else:
            summary = _from_db(args.db or "scer.db", since_s, args.model, args.tenant)
        sys.stdout.write(render(summary, args.format))
        return 0
    except _Usage as exc:
        print(f"scer-proxy report: {exc}", file=sys.stderr)
        return 2
    except _Failed as exc:
        print(f"scer-proxy report: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # an unreachable proxy, an I/O error: one line, no traceback
        print(f"scer-proxy report: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
