"""The ``bench`` and ``rate`` commands: argument handling and output around the pure cores."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from pathlib import Path
from typing import Any

import httpx

from scer_proxy.bench import BenchError, run_bench
from scer_proxy.cli import UsageError
from scer_proxy.rating import Rated, rate_submissions
from scer_proxy.ratings_book import published_csv


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"


def bench_command(args: argparse.Namespace) -> int:
    try:
        submission = asyncio.run(run_bench(args.target, args.model, workload_name=args.workload,
                                     concurrency=args.concurrency, requests=args.requests, repeats=args.repeats,
                                     task=args.task, params_b=args.params_b or 0.0))
    except BenchError as exc:
        text = str(exc)
        if text.startswith("--"):
            raise UsageError(f"scer-proxy bench: {text}") from None
        print(f"scer-proxy bench: {text}")
        return 1
    out = Path(args.out or f"scer-submission-{re.sub(r'[^A-Za-z0-9._-]+', '_', args.model)}.json")
    out.write_text(json.dumps(submission, indent=1) + "\n", encoding="utf-8")
    result = submission["result"]
    print(f"{submission['model']}  {submission['category']['task']} / {submission['category']['size_class']} / "
          f"{submission['hardware']['gpu_count']} x {submission['hardware']['gpu_model']}")
    print(f"  {_fmt(result['j_per_1k_output_tokens'])} J ({_fmt(result['wh_per_1k_output_tokens'])} Wh) "
          f"per 1,000 output tokens, spread {100 * (result['spread_rel'] or 0):.1f} % over "
          f"{submission['workload']['repeats']} repeats; SCI {_fmt(result['sci_g_per_1k_output_tokens'])} "
          f"gCO2eq per 1,000 output tokens ({result['energy_source']})")
    print(f"  submission written to {out}")
    if not args.no_submit:
        try:
            resp = httpx.post(f"{args.target.rstrip('/')}/scer/submissions", json=submission, timeout=30)
        except httpx.HTTPError as exc:
            print(f"  could not register it with the proxy: {exc}")
            return 1
        if resp.status_code == 201:
            rated = resp.json()
            print(f"  grade {rated['grade']} among {rated['peers']} peers"
                  + (f" (percentile {rated['percentile']:.1f})" if rated["percentile"] is not None else ""))
        else:
            print(f"  the proxy refused the submission: HTTP {resp.status_code} {resp.text[:200]}")
            return 1
    return 0


def _load(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"scer-proxy rate: {path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"scer-proxy rate: {path}: not a JSON submission ({exc.__class__.__name__})") from None
    if not isinstance(data, dict) or not {"model", "category", "result"} <= set(data):
        raise UsageError(f"scer-proxy rate: {path}: not a scer-proxy bench submission")
    return data


def rating_table(rated: list[Rated]) -> str:
    header = ["category", "entry", "kind", "J per 1k out", "rank", "N", "percentile", "grade"]
    rows = []
    for r in sorted(rated, key=lambda r: (str(r.entry.category), -(r.percentile or -1))):
        rows.append([str(r.entry.category), r.entry.name, "published" if r.entry.published else "submission",
                     _fmt(r.entry.j_per_1k_output_tokens), "-" if r.rank is None else str(r.rank), str(r.peers),
                     "-" if r.percentile is None else f"{r.percentile:.1f}", r.grade])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def rate_command(args: argparse.Namespace) -> int:
    submissions = [_load(path) for path in args.files]
    try:
        rated = rate_submissions(submissions, published_csv(), quintiles=args.quintiles)
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise UsageError(f"scer-proxy rate: malformed submission: {exc.__class__.__name__}: {exc}") from None
    print(rating_table(rated))
    scale = "A to E by quintiles (--quintiles; not the SCER default)" if args.quintiles else \
        "SCER 0.1: A above the 90th percentile, B from 60 to 90, C below 60"
    print(f"\nMetric: GPU energy per 1,000 output tokens, lower is better; rank 1 is the worst. Scale: {scale}. "
          "Published peers: ML.ENERGY Leaderboard v3.0 at the batch size nearest the benchmark's concurrency.")
    return 0
