"""The totals rule (``scer_proxy.carbon.totals``) on figures worked out by hand, through ``summarize``."""

from __future__ import annotations

import pytest

from scer_proxy.carbon.records import Record
from scer_proxy.carbon.totals import TOTALS, sums_of, totals, zero
from scer_proxy.summary.build import summarize


def _record(i: int, endpoint: str, tenant: str, prompt: int, completion: int, **figures: object) -> Record:
    return Record(
        request_id=f"scer-{i}",
        model="m",
        upstream="up",
        tenant=tenant,
        endpoint=endpoint,
        stream=False,
        started_at=100.0 + i,
        prompt_tokens=prompt,
        completion_tokens=completion,
        **{"status": "ok", **figures},  # type: ignore[arg-type]
    )


RECORDS = [
    _record(
        1,
        "chat.completions",
        "a",
        10,
        100,
        energy_j=50.0,
        carbon_g=2.0,
        carbon_operational_g=1.5,
        carbon_embodied_g=0.5,
        settled=True,
    ),
    _record(
        2,
        "embeddings",
        "a",
        40,
        0,
        energy_j=10.0,
        carbon_g=1.0,
        carbon_operational_g=0.75,
        carbon_embodied_g=0.25,
    ),
    _record(3, "chat.completions", "b", 5, 20),  # not metered
    _record(4, "chat.completions", "b", 5, 20, status="running"),  # not finished: left out
]


def test_totals_by_hand() -> None:
    summary = summarize(RECORDS, start=None, end=200.0)
    assert summary["window"] == {"start": 101.0, "end": 200.0}
    assert summary["totals"] == {
        "requests": 3,
        "prompt_tokens": 55,
        "completion_tokens": 120,
        "energy_j": 60.0,
        "carbon_g": 3.0,
        "carbon_operational_g": 2.25,
        "carbon_embodied_g": 0.75,
        "energy_j_per_1k_output_tokens": 600.0,  # per output token of metered requests other than embeddings
        "sci": pytest.approx(3.0 * 1000 / 140),  # per unit: output tokens, embeddings' input tokens
        "metered_requests": 2,
        "settled_requests": 1,
    }
    a, b = summary["tenants"]
    assert a["tenant"] == "a" and a["requests"] == 2 and a["energy_j"] == 60.0
    assert b == {
        "tenant": "b",
        "requests": 1,
        "prompt_tokens": 5,
        "completion_tokens": 20,
        "energy_j": None,
        "carbon_g": None,
        "carbon_operational_g": None,
        "carbon_embodied_g": None,
        "energy_j_per_1k_output_tokens": None,
        "sci": None,
        "metered_requests": 0,
        "settled_requests": 0,
    }
    assert list(summary["totals"]) == list(TOTALS)
    assert summary["models"][0]["grade"] == "unrated" and summary["models"][0]["category"] is None


def test_a_source_without_counts_and_nothing_at_all() -> None:
    uncounted = totals(
        sums_of(
            records=2, completion_tokens=10, metered=1, metered_completion=10, metered_units=10, energy_j=5.0
        ),
        counted=False,
    )
    assert uncounted["metered_requests"] is None and uncounted["settled_requests"] is None
    assert uncounted["energy_j"] == 5.0 and uncounted["energy_j_per_1k_output_tokens"] == 500.0
    empty = totals(zero())
    assert empty["requests"] == 0 and empty["energy_j"] is None and empty["sci"] is None
    with pytest.raises(ValueError, match="joules"):
        sums_of(joules=1.0)
