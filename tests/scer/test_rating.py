"""SCER 0.1 section 2.3.2 grades for hand-made peer sets, each checked against the formula."""

from __future__ import annotations

from importlib import resources

import pytest

from scer_proxy.scer.rating import (
    Category,
    Entry,
    grade_for,
    published_entries,
    quintile_grade_for,
    rate,
    size_class,
)

CAT = Category("chat", "<=20B", "H100", 1)
OTHER = Category("chat", ">66B", "H100", 4)


def _entries(values: list[float], category: Category = CAT) -> list[Entry]:
    return [Entry(f"e{i}", category, v) for i, v in enumerate(values)]


def _by_name(rated: list) -> dict:  # type: ignore[type-arg]
    return {r.entry.name: r for r in rated}


def test_fewer_than_two_entries_is_unrated() -> None:
    (only,) = rate(_entries([123.0]))
    assert only.grade == "unrated" and only.rank is None and only.percentile is None and only.peers == 1


def test_two_entries() -> None:
    rated = _by_name(rate(_entries([200.0, 100.0])))
    # Worst (more energy) is rank 1 -> percentile 0 -> C; best is rank 2 -> 100 -> A.
    assert (rated["e0"].rank, rated["e0"].percentile, rated["e0"].grade) == (1, 0.0, "C")
    assert (rated["e1"].rank, rated["e1"].percentile, rated["e1"].grade) == (2, 100.0, "A")


def test_ties_take_the_best_rank_of_their_group() -> None:
    rated = _by_name(rate(_entries([500.0, 300.0, 300.0, 100.0])))
    # Ranks worst-first: 500 -> 1; the two 300s hold positions 2 and 3 and both take 3; 100 -> 4.
    assert [rated[f"e{i}"].rank for i in range(4)] == [1, 3, 3, 4]
    assert rated["e1"].percentile == pytest.approx((3 - 1) / (4 - 1) * 100)
    assert rated["e1"].grade == "B"  # 66.7 is from 60 to 90


def test_all_tied() -> None:
    rated = rate(_entries([7.0, 7.0, 7.0]))
    assert {r.rank for r in rated} == {3} and all(r.grade == "A" for r in rated)


@pytest.mark.parametrize("n", [3, 7, 11, 21, 50])
def test_many_entries_each_grade_matches_the_formula(n: int) -> None:
    values = [1000.0 / (i + 1) for i in range(n)]  # strictly decreasing: e0 is the worst
    for r in rate(_entries(values)):
        index = int(r.entry.name[1:])
        rank = index + 1
        percentile = (rank - 1) / (n - 1) * 100
        assert r.rank == rank and r.percentile == pytest.approx(percentile)
        expected = "A" if percentile > 90 else "B" if percentile >= 60 else "C"
        assert r.grade == expected


def test_boundaries() -> None:
    assert grade_for(90.0) == "B" and grade_for(90.0001) == "A"
    assert grade_for(60.0) == "B" and grade_for(59.999) == "C"
    assert [quintile_grade_for(p) for p in (100, 80, 79.9, 40, 0)] == ["A", "A", "B", "C", "E"]
    assert rate(_entries([3.0, 2.0, 1.0]), quintiles=True)[2].grade == "A"


def test_categories_are_rated_apart() -> None:
    rated = _by_name(rate([*_entries([2.0, 1.0]), Entry("big", OTHER, 50.0)]))
    assert rated["big"].grade == "unrated" and rated["e1"].grade == "A"


@pytest.mark.parametrize(
    ("params", "name"),
    [(8, "<=20B"), (20, "<=20B"), (20.5, "<=66B"), (66, "<=66B"), (70, ">66B"), (405, ">66B")],
)
def test_size_classes(params: float, name: str) -> None:
    assert size_class(params) == name


def test_published_peers_pick_the_batch_nearest_the_concurrency() -> None:
    text = (resources.files("scer_proxy") / "data" / "mlenergy-v3-llm.csv").read_text()
    peers = published_entries(text, concurrency=32)
    llama = next(
        p for p in peers if p.name == "meta-llama/Llama-3.1-8B-Instruct" and p.category.gpu_model == "H100"
    )
    assert llama.published and "batch 32" in llama.source
    assert llama.j_per_1k_output_tokens == pytest.approx(0.165055 * 1000)
    assert llama.category == Category("chat", "<=20B", "H100", 1)
    assert len({p.category for p in peers}) > 5
