"""The per-request record: what the ledger keeps and what the headers, ``usage.scer`` and lookups show.

Never prompt or completion text, never credentials: only ids, times, counts, energy and carbon.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from decimal import Decimal
from operator import attrgetter
from typing import Any

from scer_proxy.attribution.timeline import Share
from scer_proxy.carbon.sci import Embodied, energy_with_pue_j, request_carbon


@dataclass(slots=True)
class Record:
    """One request's record. Treated as a value: changes make a new record (:meth:`evolve`), never an
    update in place (slots rather than frozen: building one is about twice as fast)."""

    request_id: str
    model: str
    upstream: str
    tenant: str
    endpoint: str
    stream: bool
    started_at: float  # Unix seconds
    ended_at: float | None = None
    status: str = "running"  # running | ok | upstream_error | cancelled | error
    http_status: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_source: str = "estimate"  # upstream | tokenizer | estimate
    energy_j: float | None = None  # PUE included; None when no meter figure exists
    energy_gpu_j: float | None = None  # the meter's (or the estimate's) figure, before PUE
    energy_prefill_j: float | None = None
    energy_decode_j: float | None = None
    energy_idle_j: float | None = None  # the amortized idle energy included in energy_j (PUE included)
    energy_source: str = "none"  # nvml | dcgm | rapl | simulated | estimate | none
    energy_uncertainty_rel: float | None = None  # stated relative uncertainty of energy_j
    hardware_s: float | None = None
    carbon_g: float | None = None
    carbon_operational_g: float | None = None
    carbon_embodied_g: float | None = None
    grid_intensity_g_per_kwh: float | None = None
    grid_source: str = ""
    grid_age_s: float | None = None  # seconds since a live grid figure was fetched; None for table/static
    sci: float | None = None  # gCO2e per 1,000 output tokens (input tokens for embeddings)
    rating: str = "unrated"
    settled: bool = False
    flags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def functional_units(self) -> int:
        return functional_units(self.endpoint, self.prompt_tokens, self.completion_tokens)

    def evolve(self, **changes: Any) -> Record:
        """A copy with ``changes``: ``dataclasses.replace`` without its per-call walk over the fields'
        metadata (a record is copied twice a request, at its end and at its settlement)."""
        values = list(_ALL_FIELDS(self))
        for name, value in changes.items():
            index = _FIELD_INDEX.get(name)
            if index is None:
                raise TypeError(f"Record has no field {name!r}")
            values[index] = value
        return Record(*values)

    def with_energy(
        self,
        share: Share,
        *,
        source: str,
        pue: float,
        intensity_g_per_kwh: float,
        grid_source: str,
        embodied: Embodied,
    ) -> Record:
        """The record with energy and carbon figures from an attribution share."""
        return self.evolve(
            **energy_fields(
                share,
                source=source,
                pue=pue,
                intensity_g_per_kwh=intensity_g_per_kwh,
                grid_source=grid_source,
                embodied=embodied,
                units=self.functional_units,
            )
        )

    def scer(self) -> dict[str, Any]:
        """The ``usage.scer`` object (and ``: scer`` comment) of the contract."""
        return {
            "request_id": self.request_id,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "token_source": self.token_source,
            "energy_j": self.energy_j,
            "energy_source": self.energy_source,
            "energy_uncertainty_rel": self.energy_uncertainty_rel,
            "carbon_g": self.carbon_g,
            "carbon_operational_g": self.carbon_operational_g,
            "carbon_embodied_g": self.carbon_embodied_g,
            "grid_intensity_g_per_kwh": self.grid_intensity_g_per_kwh,
            "sci": self.sci,
            "rating": self.rating,
            "settled": self.settled,
        }

    def headers(self) -> dict[str, str]:
        """The ``X-SCER-*`` headers of a metered, non-streamed response."""
        out = {
            "X-SCER-Request-Id": self.request_id,
            "X-SCER-Model": self.model,
            "X-SCER-Prompt-Tokens": str(self.prompt_tokens),
            "X-SCER-Completion-Tokens": str(self.completion_tokens),
            "X-SCER-Token-Source": self.token_source,
            "X-SCER-Energy-Source": self.energy_source,
            "X-SCER-Rating": self.rating,
        }
        for name, value in zip(_NUMBER_HEADERS, _NUMBER_FIELDS(self), strict=True):
            if value is not None:
                out[name] = format_number(value)
        return out

    @property
    def sci_per_1k_total_tokens(self) -> float | None:
        """gCO2e per 1,000 tokens in and out (a second functional unit, derived)."""
        total = self.prompt_tokens + self.completion_tokens
        return None if self.carbon_g is None or total <= 0 else self.carbon_g * 1000.0 / total

    def to_json(self) -> dict[str, Any]:
        """The stored fields plus the derived SCI per request and per 1,000 total tokens (the fields read
        in one C call, not ``asdict``'s deep copy: ``/scer/requests`` makes 10,000 of these)."""
        out = dict(zip(_FIELD_NAMES, _ALL_FIELDS(self), strict=True))
        out["flags"] = list(self.flags)
        out["sci_per_request_g"] = self.carbon_g
        out["sci_per_1k_total_tokens"] = self.sci_per_1k_total_tokens
        return out


_FIELD_NAMES = tuple(f.name for f in fields(Record))
_FIELD_INDEX = {name: index for index, name in enumerate(_FIELD_NAMES)}
_ALL_FIELDS = attrgetter(*_FIELD_NAMES)
# The numeric headers, in the contract's order, and the fields they show.
_NUMBER_HEADERS, _NUMBER_FIELD_NAMES = zip(
    ("X-SCER-Energy-J", "energy_j"),
    ("X-SCER-Carbon-gCO2e", "carbon_g"),
    ("X-SCER-Carbon-Operational-gCO2e", "carbon_operational_g"),
    ("X-SCER-Carbon-Embodied-gCO2e", "carbon_embodied_g"),
    ("X-SCER-Grid-Intensity", "grid_intensity_g_per_kwh"),
    ("X-SCER-SCI", "sci"),
    ("X-SCER-Energy-Uncertainty", "energy_uncertainty_rel"),
    strict=True,
)
_NUMBER_FIELDS = attrgetter(*_NUMBER_FIELD_NAMES)


def functional_units(endpoint: str, prompt_tokens: int, completion_tokens: int) -> int:
    """R of SCI: output tokens, or input tokens for embeddings."""
    return prompt_tokens if endpoint == "embeddings" else completion_tokens


def energy_fields(
    share: Share,
    *,
    source: str,
    pue: float,
    intensity_g_per_kwh: float,
    grid_source: str,
    embodied: Embodied,
    units: int,
) -> dict[str, Any]:
    """The energy and carbon fields of a record, from an attribution share (PUE applied here)."""
    energy_j = energy_with_pue_j(share.energy_j, pue)
    carbon = request_carbon(
        energy_j=energy_j,
        hw_s=share.hw_s,
        intensity_g_per_kwh=intensity_g_per_kwh,
        embodied=embodied,
        units=units,
    )
    return {
        "energy_j": energy_j,
        "energy_gpu_j": share.energy_j,
        "energy_prefill_j": energy_with_pue_j(share.prefill_j, pue),
        "energy_decode_j": energy_with_pue_j(share.decode_j, pue),
        "energy_idle_j": energy_with_pue_j(share.idle_j, pue),
        "energy_source": source,
        "hardware_s": share.hw_s,
        "carbon_g": carbon.total_g,
        "carbon_operational_g": carbon.operational_g,
        "carbon_embodied_g": carbon.embodied_g,
        "grid_intensity_g_per_kwh": intensity_g_per_kwh,
        "grid_source": grid_source,
        "sci": carbon.sci_g_per_unit,
        "settled": share.settled,
    }


def format_number(value: float) -> str:
    """A plain decimal with up to 9 significant digits, no exponent, no units."""
    text = f"{value:.9g}"
    if "e" in text:
        exponent = int(text[text.index("e") + 1 :])
        # Small figures (carbon in grams) are the usual case: 9 significant digits are 8 - exponent
        # decimals, which float formatting gives without the detour through Decimal.
        text = f"{value:.{8 - exponent}f}" if exponent < 0 else format(Decimal(text), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"
