"""The proxy's ratings: the latest bench submission of each served model, rated against its peers.

``X-SCER-Rating`` and the summary's grade come from here: ``unrated`` until a submission exists (and
while a category has fewer than two entries).
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

from scer_proxy.scer.rating import Rated, rate_submissions, submission_entry


@functools.cache
def published_csv() -> str:
    return (resources.files("scer_proxy") / "data" / "mlenergy-v3-llm.csv").read_text(encoding="utf-8")


class RatingsBook:
    def __init__(self) -> None:
        self._latest: dict[str, dict[str, Any]] = {}
        self._grades: dict[str, Rated] = {}

    def add(self, submission: dict[str, Any]) -> Rated:
        """Keep a submission (the latest per model wins) and re-rate; returns the model's rating."""
        entry = submission_entry(submission)  # validates the shape
        self._latest[entry.name] = submission
        rated = rate_submissions(list(self._latest.values()), published_csv())
        self._grades = {r.entry.name: r for r in rated if not r.entry.published}
        return self._grades[entry.name]

    def grade(self, model: str) -> str:
        rated = self._grades.get(model)
        return rated.grade if rated is not None else "unrated"

    def category(self, model: str) -> str | None:
        rated = self._grades.get(model)
        return str(rated.entry.category) if rated is not None else None

    def rated(self, model: str) -> Rated | None:
        return self._grades.get(model)

    def submissions(self) -> list[dict[str, Any]]:
        return list(self._latest.values())
