"""``scer-proxy rate``: rate bench submissions per SCER among themselves and the published peers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from scer_proxy.cli.errors import USAGE, CliError, command, file_not_found
from scer_proxy.cli.tables import table
from scer_proxy.scer.book import published_csv
from scer_proxy.scer.rating import Rated, rate_submissions


def load_submission(path: str, flag: str = "") -> dict[str, Any]:
    """A ``scer-proxy bench`` submission file; any mistake is a usage error naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise file_not_found(path, flag) from None
    except (OSError, ValueError) as exc:
        raise CliError(f"{path}: not a JSON submission ({exc.__class__.__name__})", USAGE) from None
    if not isinstance(data, dict) or not {"model", "category", "result"} <= set(data):
        raise CliError(f"{path}: not a scer-proxy bench submission", USAGE)
    return data


def rating_table(rated: list[Rated]) -> str:
    header = ["category", "entry", "kind", "J per 1k out", "rank", "N", "percentile", "grade"]
    rows = [
        [
            str(r.entry.category),
            r.entry.name,
            "published" if r.entry.published else "submission",
            r.entry.j_per_1k_output_tokens,
            r.rank,
            r.peers,
            "-" if r.percentile is None else f"{r.percentile:.1f}",
            r.grade,
        ]
        for r in sorted(rated, key=lambda r: (str(r.entry.category), -(r.percentile or -1)))
    ]
    return table(header, rows)


@command("rate")
def rate_command(args: argparse.Namespace) -> int:
    submissions = [load_submission(path) for path in args.files]
    try:
        rated = rate_submissions(submissions, published_csv(), quintiles=args.quintiles)
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise CliError(f"malformed submission: {exc.__class__.__name__}: {exc}", USAGE) from None
    print(rating_table(rated))
    scale = (
        "A to E by quintiles (--quintiles; not the SCER default)"
        if args.quintiles
        else "SCER 0.1: A above the 90th percentile, B from 60 to 90, C below 60"
    )
    print(
        f"\nMetric: GPU energy per 1,000 output tokens, lower is better; rank 1 is the worst. Scale: {scale}. "
        "Published peers: ML.ENERGY Leaderboard v3.0 at the batch size nearest the benchmark's concurrency."
    )
    return 0
