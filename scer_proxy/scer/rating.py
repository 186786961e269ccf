"""SCER ratings (pure, no I/O): categorization, published peers, and the percentile grade.

Software Carbon Efficiency Rating (SCER) 0.1, a draft of the Green Software Foundation, section 2.3.2:
entries of one category are ranked from the worst (rank 1) to the best (rank N);
``percentile = (rank - 1) / (N - 1) x 100``; grade A above 90, B from 60 to 90, C below 60; entries
that tie all take the best rank of their group; with fewer than two entries there is no rating.

The metric is GPU energy per 1,000 output tokens on the standard benchmark workload (lower is better),
so that peers on different grids compare fairly; the label shows the deployment's own SCI beside it.
Category = task x size class (at most 20B, at most 66B, above 66B parameters, as AI Energy Score
classes them) x GPU model x GPU count.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

SIZE_CLASSES = ((20.0, "<=20B"), (66.0, "<=66B"), (math.inf, ">66B"))


def size_class(params_b: float) -> str:
    """AI Energy Score's size classes, by total parameters in billions."""
    for limit, name in SIZE_CLASSES:
        if params_b <= limit:
            return name
    return SIZE_CLASSES[-1][1]  # pragma: no cover - inf catches all


def gpu_family(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100'; names without a known family are kept as they are."""
    upper = name.upper()
    for family in ("GB200", "B200", "H200", "H100", "A100", "L40S", "L4", "A10G", "MI300X"):
        if family in upper:
            return family
    return name.strip() or "unknown"


@dataclass(frozen=True)
class Category:
    task: str
    size_class: str
    gpu_model: str
    gpu_count: int

    def __str__(self) -> str:
        return f"{self.task} / {self.size_class} / {self.gpu_count} x {self.gpu_model}"

    @staticmethod
    def of(task: str, params_b: float, gpu_model: str, gpu_count: int) -> Category:
        return Category(task, size_class(params_b), gpu_family(gpu_model), gpu_count)


@dataclass(frozen=True)
class Entry:
    """One rated thing: a submission of ours or a published reference row."""

    name: str
    category: Category
    j_per_1k_output_tokens: float
    published: bool = False
    source: str = ""


@dataclass(frozen=True)
class Rated:
    entry: Entry
    rank: int | None
    peers: int
    percentile: float | None
    grade: str  # A | B | C | unrated


def grade_for(percentile: float) -> str:
    """A above 90, B from 60 to 90, C below 60 (SCER 0.1, 2.3.2)."""
    if percentile > 90.0:
        return "A"
    if percentile >= 60.0:
        return "B"
    return "C"


def quintile_grade_for(percentile: float) -> str:
    """An A to E scale by quintiles (not the SCER default; offered behind a flag)."""
    for limit, letter in ((80.0, "A"), (60.0, "B"), (40.0, "C"), (20.0, "D")):
        if percentile >= limit:
            return letter
    return "E"


def rate(entries: Sequence[Entry], *, quintiles: bool = False) -> list[Rated]:
    """Rate every entry against the entries of its own category."""
    by_category: dict[Category, list[Entry]] = {}
    for entry in entries:
        by_category.setdefault(entry.category, []).append(entry)
    out: list[Rated] = []
    for group in by_category.values():
        n = len(group)
        if n < 2:
            out.extend(Rated(e, None, n, None, "unrated") for e in group)
            continue
        # Worst first: the most energy per 1,000 output tokens is rank 1. Ties take the best rank of
        # their group, that is the highest position any of them holds.
        ordered = sorted(group, key=lambda e: -e.j_per_1k_output_tokens)
        best_rank: dict[float, int] = {}
        for position, entry in enumerate(ordered, start=1):
            best_rank[entry.j_per_1k_output_tokens] = position
        for entry in group:
            rank = best_rank[entry.j_per_1k_output_tokens]
            percentile = (rank - 1) / (n - 1) * 100.0
            grade = quintile_grade_for(percentile) if quintiles else grade_for(percentile)
            out.append(Rated(entry, rank, n, percentile, grade))
    return out


def published_entries(csv_text: str, *, task: str = "chat", concurrency: int) -> list[Entry]:
    """ML.ENERGY v3 chat rows as published peers: per (model, GPU model, GPU count), the row whose batch
    size is nearest the benchmark's concurrency."""
    rows = [r for r in csv.DictReader(io.StringIO(csv_text)) if r["task"] == "lm-arena-chat"]
    best: dict[tuple[str, str, str], dict[str, str]] = {}
    for row in rows:
        key = (row["model_id"], row["gpu_model"], row["num_gpus"])
        distance = abs(float(row["avg_batch_size"]) - concurrency)
        if key not in best or distance < abs(float(best[key]["avg_batch_size"]) - concurrency):
            best[key] = row
    out = []
    for (model_id, gpu, count), row in sorted(best.items()):
        category = Category.of(task, float(row["total_params_billions"]), gpu, int(count))
        out.append(
            Entry(
                name=model_id,
                category=category,
                j_per_1k_output_tokens=float(row["energy_per_token_joules"]) * 1000.0,
                published=True,
                source=f"ML.ENERGY Leaderboard v3.0, batch {float(row['avg_batch_size']):.0f}",
            )
        )
    return out


def submission_entry(submission: dict[str, object]) -> Entry:
    """A bench submission (``scer-proxy bench`` JSON) as an entry to rate."""
    category = submission["category"]
    result = submission["result"]
    assert isinstance(category, dict) and isinstance(result, dict)
    return Entry(
        name=str(submission["model"]),
        category=Category(
            str(category["task"]),
            str(category["size_class"]),
            str(category["gpu_model"]),
            int(category["gpu_count"]),
        ),
        j_per_1k_output_tokens=float(result["j_per_1k_output_tokens"]),
        published=False,
        source=f"bench {submission.get('created_at', '')}".strip(),
    )


def submission_concurrency(submission: dict[str, object]) -> int:
    workload = submission.get("workload")
    return int(workload.get("concurrency", 32)) if isinstance(workload, dict) else 32


def rate_submissions(
    submissions: Sequence[dict[str, object]], published_csv: str, *, quintiles: bool = False
) -> list[Rated]:
    """Rate submissions among themselves and the published peers of their category.

    Submissions are compared at their benchmark concurrency: each group of one concurrency is rated
    with the published rows nearest that batch size.
    """
    by_concurrency: dict[int, list[Entry]] = {}
    for submission in submissions:
        by_concurrency.setdefault(submission_concurrency(submission), []).append(submission_entry(submission))
    out: list[Rated] = []
    for concurrency, ours in sorted(by_concurrency.items()):
        categories = {e.category for e in ours}
        peers = [
            p for p in published_entries(published_csv, concurrency=concurrency) if p.category in categories
        ]
        out.extend(rate([*ours, *peers], quintiles=quintiles))
    return out
