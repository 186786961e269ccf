"""The totals rule: from summed quantities of a group of records to the summary's ``totals`` keys.

Every summary applies it: the ledger's (sums in SQL over its rollup), ``summarize``'s (sums in Python
over records) and the Prometheus report's (sums of scraped samples). Each source sums ``QUANTITIES``
its own way; ``totals`` turns one group's sums into figures and ``summary_body`` assembles the
``/scer/summary`` shape from sums per model and tenant. Pure: the ledger below the summary uses it too.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, MutableMapping, Sequence
from typing import Any, TypeVar

from scer_proxy.carbon.records import Record

K = TypeVar("K", bound=Hashable)

# Integer quantities, then amounts (floats, of metered records only); a group's sums are in this order.
COUNTS: tuple[str, ...] = (
    "records",
    "prompt_tokens",
    "completion_tokens",
    "metered",  # records with an energy figure
    "settled",  # metered records whose figure is final
    "metered_completion",  # output tokens of metered records other than embeddings
    "metered_units",  # functional units (SCI's R) of metered records
)
AMOUNTS: tuple[str, ...] = ("energy_j", "carbon_g", "carbon_operational_g", "carbon_embodied_g")
QUANTITIES: tuple[str, ...] = COUNTS + AMOUNTS

# The keys of ``totals``, in order (each model and tenant entry has them too).
TOTALS: tuple[str, ...] = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "energy_j",
    "carbon_g",
    "carbon_operational_g",
    "carbon_embodied_g",
    "energy_j_per_1k_output_tokens",
    "sci",
    "metered_requests",
    "settled_requests",
)


def zero() -> list[float]:
    """Sums of no record."""
    return [0] * len(QUANTITIES)


def contribution(r: Record) -> tuple[float, ...]:
    """One record's part of each of ``QUANTITIES`` (the ledger's SQL computes the same per row)."""
    if r.energy_j is None:
        return (1, r.prompt_tokens, r.completion_tokens, 0, 0, 0, 0, 0.0, 0.0, 0.0, 0.0)
    return (
        1,
        r.prompt_tokens,
        r.completion_tokens,
        1,
        int(r.settled),
        0 if r.endpoint == "embeddings" else r.completion_tokens,
        r.functional_units,
        r.energy_j,
        r.carbon_g or 0.0,
        r.carbon_operational_g or 0.0,
        r.carbon_embodied_g or 0.0,
    )


def sums_of(**values: float) -> list[float]:
    """Sums by quantity name (those not named are 0); ValueError for a name not in ``QUANTITIES``."""
    unknown = values.keys() - set(QUANTITIES)
    if unknown:
        raise ValueError(f"not summed quantities: {sorted(unknown)}")
    return [values.get(q, 0) for q in QUANTITIES]


def add(into: list[float], values: Sequence[float], sign: float = 1.0) -> None:
    """Add ``values`` (``QUANTITIES`` order) into ``into``; ``sign`` -1 takes them away."""
    for i, v in enumerate(values):
        into[i] += sign * v if sign != 1.0 else v


def add_to(
    groups: MutableMapping[K, list[float]], key: K, values: Sequence[float], sign: float = 1.0
) -> None:
    """Add ``values`` into the sums of group ``key`` (created at zero)."""
    sums = groups.get(key)
    if sums is None:
        sums = groups[key] = zero()
    add(sums, values, sign)


def totals(sums: Sequence[float], *, counted: bool = True) -> dict[str, Any]:
    """The ``TOTALS`` of a group from its sums (``QUANTITIES`` order).

    Energy and carbon are null when no record of the group was metered; energy per 1,000 output tokens
    and SCI are null without metered output tokens (units). ``counted=False``: the source does not count
    metered and settled records (Prometheus), so ``metered`` only tells whether any record was metered
    and both counts are null.
    """
    s = dict(zip(QUANTITIES, sums, strict=True))
    metered = round(s["metered"])
    energy_j, carbon_g = float(s["energy_j"]), float(s["carbon_g"])
    metered_completion, metered_units = round(s["metered_completion"]), round(s["metered_units"])
    return {
        "requests": round(s["records"]),
        "prompt_tokens": round(s["prompt_tokens"]),
        "completion_tokens": round(s["completion_tokens"]),
        "energy_j": energy_j if metered else None,
        "carbon_g": carbon_g if metered else None,
        "carbon_operational_g": float(s["carbon_operational_g"]) if metered else None,
        "carbon_embodied_g": float(s["carbon_embodied_g"]) if metered else None,
        "energy_j_per_1k_output_tokens": energy_j * 1000.0 / metered_completion
        if metered_completion
        else None,
        "sci": carbon_g * 1000.0 / metered_units if metered_units else None,
        "metered_requests": metered if counted else None,
        "settled_requests": round(s["settled"]) if counted else None,
    }


def summary_body(
    groups: Mapping[tuple[str, ...], Sequence[float]],
    *,
    start: float | None,
    end: float,
    grades: Mapping[str, str] | None = None,
    categories: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``window``, ``totals``, ``models`` (with category and grade) and ``tenants`` from the sums per
    (model, tenant) of the records in the window; models and tenants sorted by name."""
    total = zero()
    by_model: dict[str, list[float]] = {}
    by_tenant: dict[str, list[float]] = {}
    for (model, tenant), sums in groups.items():
        add_to(by_model, model, sums)
        add_to(by_tenant, tenant, sums)
        add(total, sums)
    return {
        "window": {"start": start, "end": end},
        "totals": totals(total),
        "models": [
            {
                "model": name,
                "category": (categories or {}).get(name),
                "grade": (grades or {}).get(name, "unrated"),
                **totals(sums),
            }
            for name, sums in sorted(by_model.items())
        ],
        "tenants": [{"tenant": name, **totals(sums)} for name, sums in sorted(by_tenant.items())],
    }
