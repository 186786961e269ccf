"""The label's manifest (pure, no I/O): an Impact Framework manifest of the SCI behind a SCER label.

Format, as verified against the Impact Framework's own sources and docs (Green-Software-Foundation/if:
``src/common/util/validations.ts`` ``manifestSchema``; ``@grnsft/if`` 1.0.2 ``build/common/util/
validations.d.ts``, ``build/if-run/types/compute.d.ts``; the builtin READMEs and example manifests
``manifests/examples/builtins/sci/success.yml``, ``.../sci-embodied/success.yml``,
``.../features/aggregate.yml``):

- top level: ``name`` (required), ``description``, ``tags`` (``kind``, ``complexity``, ``category``),
  ``explainer``, ``aggregation`` (``metrics``: list of names, ``type``: horizontal | time | vertical |
  component | both), ``initialize`` (required) and ``tree`` (required). Unknown top-level keys are
  stripped, not refused, by IF's zod schema; this module adds one, ``scer``, with the label's own
  figures and the boundary in structured form.
- ``initialize.plugins.<name>``: ``path`` (``builtin``), ``method``, ``config``, ``parameter-metadata``
  (``inputs``/``outputs``: ``unit``, ``description``, ``aggregation-method: {time, component}``).
- ``tree.children.<name>``: ``pipeline: {compute: [plugin names in order]}``, ``defaults`` (merged
  into every input), ``inputs`` (each with ``timestamp`` and ``duration``), and, as ``if-run`` writes
  them, ``outputs`` and ``aggregated``.
- Builtins used, with their config keys: ``Multiply`` (``input-parameters``, ``output-parameter``),
  ``Divide`` (``numerator``, ``denominator``, ``output``), ``Sum`` (``input-parameters``,
  ``output-parameter``) and ``Sci`` (``functional-unit``: the input holding the unit count;
  ``sci = carbon / functional unit``). The embodied share is computed with ``Divide`` and
  ``Multiply`` from SCI's own terms (``device/emissions-embodied``, ``time-reserved``,
  ``device/expected-lifespan``, ``resources-reserved``, ``resources-total``, the names IF's
  ``SciEmbodied`` used before 1.0), because IF 1.0's ``SciEmbodied`` models servers by vCPU, memory
  and disk rather than by a GPU's embodied total.

SCI 1.1: ``SCI = (O + M) per R``, ``O = E x I``, ``M = TE x (TR / EL) x (RR / ToR)``. Here E is kWh
(PUE included), I gCO2e/kWh, TE the embodied emissions of one whole server (all its GPUs and the
rest), RR/ToR the GPUs reserved out of the server's GPUs, TR the hardware seconds attributed to the
requests, EL the expected lifespan in seconds, and R the output tokens in thousands (the functional
unit: 1,000 output tokens). :func:`ManifestInputs.sci` computes exactly what the pipeline computes, in
the same order, and the label shows that same number.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote

from scer_proxy.carbon.embodied import EMBODIED_PRESETS
from scer_proxy.carbon.records import Record
from scer_proxy.carbon.sci import JOULES_PER_KWH, SECONDS_PER_YEAR, Embodied
from scer_proxy.scer.label import BENCHMARK, FIGURES, LIVE, LabelData, format_sig3, render_label_svg
from scer_proxy.scer.rating import Rated

FUNCTIONAL_UNIT = "1,000 output tokens"
FU_PARAMETER = "output-tokens"
FU_SCALED = "output-tokens-thousands"
FU_PER = 1000

PLUGIN_ORDER = (
    "operational-carbon",
    "time-share",
    "resource-share",
    "embodied-carbon",
    "sum-carbon",
    "functional-unit",
    "sci",
)

BOUNDARY_INCLUDED = (
    "energy of the GPUs of the serving hardware while it runs inference, measured (NVML, DCGM, RAPL) "
    "or estimated as the energy source says, attributed to requests by their tokens and timing",
    "data-centre overhead through the configured PUE, applied to that energy",
    "embodied emissions of the GPUs reserved and their share of the server, in proportion to the "
    "hardware time attributed to the requests over the hardware's expected lifespan",
)
BOUNDARY_EXCLUDED = (
    "client devices",
    "network transfer between clients and the server",
    "model training, fine-tuning and data preparation",
    "host CPU, memory, storage and cooling energy not covered by the meter or the PUE",
    "idle capacity kept for redundancy outside the serving hardware",
)


@dataclass(frozen=True, kw_only=True)
class ManifestInputs:
    """The SCI inputs of one observation window (all the requests behind one label)."""

    timestamp: str  # ISO 8601 start of the window
    duration_s: float  # length of the window (IF wants >= 1)
    energy_kwh: float  # E, PUE included
    grid_intensity_g_per_kwh: float  # I
    device_emissions_embodied_g: float  # TE, one whole server
    time_reserved_s: float  # TR, hardware seconds attributed
    expected_lifespan_s: float  # EL
    resources_reserved: float  # RR, GPUs used
    resources_total: float  # ToR, GPUs per server
    output_tokens: int  # the functional unit count before scaling
    energy_source: str = ""
    pue: float = 1.0

    def __post_init__(self) -> None:
        for name in (
            "duration_s",
            "energy_kwh",
            "grid_intensity_g_per_kwh",
            "device_emissions_embodied_g",
            "time_reserved_s",
            "expected_lifespan_s",
            "resources_reserved",
            "resources_total",
            "pue",
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.output_tokens <= 0:
            raise ValueError("no output tokens: the SCI per 1,000 output tokens is undefined")
        if self.expected_lifespan_s <= 0 or self.resources_total <= 0:
            raise ValueError("expected_lifespan_s and resources_total must be > 0")

    def carbon_operational_g(self) -> float:
        """O = E x I (the pipeline's ``operational-carbon``)."""
        return self.energy_kwh * self.grid_intensity_g_per_kwh

    def time_share(self) -> float:
        return self.time_reserved_s / self.expected_lifespan_s

    def resource_share(self) -> float:
        return self.resources_reserved / self.resources_total

    def carbon_embodied_g(self) -> float:
        """M = TE x time share x resource share (the pipeline's ``embodied-carbon``)."""
        return self.device_emissions_embodied_g * self.time_share() * self.resource_share()

    def carbon_g(self) -> float:
        return self.carbon_operational_g() + self.carbon_embodied_g()

    def functional_units(self) -> float:
        """R: output tokens in thousands."""
        return self.output_tokens / FU_PER

    def sci(self) -> float:
        """gCO2e per 1,000 output tokens, computed as the manifest's pipeline computes it."""
        return self.carbon_g() / self.functional_units()

    def energy_wh_per_1k_output_tokens(self) -> float:
        return self.energy_kwh * 1000.0 / self.functional_units()


def server_embodied_g(embodied: Embodied) -> float:
    """TE: embodied emissions of one whole server (all its GPUs and the rest), grams."""
    return (embodied.gpu_kg * embodied.gpus_per_server + embodied.server_kg) * 1000.0


def inputs_from_records(records: Iterable[Record], *, embodied: Embodied, pue: float = 1.0) -> ManifestInputs:
    """The inputs behind the records of one model (metered generation requests only).

    The intensity is the energy-weighted mean of the records' intensities (their operational grams over
    their kWh), so that the manifest reproduces the records' own carbon.
    """
    chosen = [r for r in records if r.energy_j is not None and r.endpoint != "embeddings"]
    if not chosen:
        raise ValueError("no metered generation requests")
    energy_j = sum(r.energy_j or 0.0 for r in chosen)
    operational = sum(r.carbon_operational_g or 0.0 for r in chosen)
    intensity = _intensity(energy_j, operational, chosen[-1].grid_intensity_g_per_kwh)
    start = min(r.started_at for r in chosen)
    end = max((r.ended_at or r.started_at) for r in chosen)
    sources = sorted({r.energy_source for r in chosen})
    return ManifestInputs(
        timestamp=iso_time(start),
        duration_s=max(1.0, end - start),
        energy_kwh=energy_j / JOULES_PER_KWH,
        grid_intensity_g_per_kwh=intensity,
        device_emissions_embodied_g=server_embodied_g(embodied),
        time_reserved_s=sum(r.hardware_s or 0.0 for r in chosen),
        expected_lifespan_s=embodied.lifetime_years * SECONDS_PER_YEAR,
        resources_reserved=embodied.gpus_used,
        resources_total=embodied.gpus_per_server,
        output_tokens=sum(r.completion_tokens for r in chosen),
        energy_source=",".join(sources),
        pue=pue,
    )


def inputs_from_totals(
    *,
    energy_j: float,
    carbon_operational_g: float,
    carbon_embodied_g: float,
    output_tokens: int,
    embodied: Embodied,
    started_at: float,
    duration_s: float,
    hardware_s: float | None = None,
    grid_intensity_g_per_kwh: float | None = None,
    energy_source: str = "",
    pue: float = 1.0,
) -> ManifestInputs:
    """The inputs behind aggregate figures (a bench submission): ``energy_j`` with PUE included.

    The intensity is operational grams over kWh (``grid_intensity_g_per_kwh`` when there is no energy);
    the hardware time is ``hardware_s`` when known, otherwise the time that gives ``carbon_embodied_g``.
    """
    intensity = _intensity(energy_j, carbon_operational_g, grid_intensity_g_per_kwh)
    lifespan_s = embodied.lifetime_years * SECONDS_PER_YEAR
    te = server_embodied_g(embodied)
    if hardware_s is None:
        per_s = te * (embodied.gpus_used / embodied.gpus_per_server) / lifespan_s
        hardware_s = carbon_embodied_g / per_s if per_s > 0 else 0.0
    return ManifestInputs(
        timestamp=iso_time(started_at),
        duration_s=max(1.0, duration_s),
        energy_kwh=energy_j / JOULES_PER_KWH,
        grid_intensity_g_per_kwh=intensity,
        device_emissions_embodied_g=te,
        time_reserved_s=hardware_s,
        expected_lifespan_s=lifespan_s,
        resources_reserved=embodied.gpus_used,
        resources_total=embodied.gpus_per_server,
        output_tokens=output_tokens,
        energy_source=energy_source,
        pue=pue,
    )


def _intensity(energy_j: float, operational_g: float, fallback: float | None) -> float:
    kwh = energy_j / JOULES_PER_KWH
    if kwh > 0:
        return operational_g / kwh
    return fallback if fallback is not None else 0.0


def iso_time(unix_s: float) -> str:
    """Unix seconds as an ISO 8601 UTC timestamp with milliseconds."""
    return datetime.fromtimestamp(unix_s, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


FROM_PARAM = {LIVE: "traffic", BENCHMARK: "benchmark"}  # the ``from`` query parameter of each origin


def _from_query(figures_from: str) -> str:
    return "" if figures_from == LIVE else f"?from={FROM_PARAM[figures_from]}"


def manifest_url(base_url: str, model: str, figures_from: str = LIVE) -> str:
    """``{base}/scer/manifest/{model}.yaml`` with the model percent-encoded (``/`` as ``%2F``), and
    ``?from=benchmark`` for the manifest of the model's benchmark submission."""
    return f"{base_url.rstrip('/')}/scer/manifest/{quote(model, safe='')}.yaml{_from_query(figures_from)}"


def label_url(base_url: str, model: str, figures_from: str = LIVE) -> str:
    """``{base}/scer/label/{model}.svg`` with the model percent-encoded (``?from=benchmark`` likewise)."""
    return f"{base_url.rstrip('/')}/scer/label/{quote(model, safe='')}.svg{_from_query(figures_from)}"


def _meta(unit: str, description: str, time: str = "sum", component: str = "sum") -> dict[str, Any]:
    return {
        "unit": unit,
        "description": description,
        "aggregation-method": {"time": time, "component": component},
    }


def _plugins() -> dict[str, Any]:
    return {
        "operational-carbon": {
            "path": "builtin",
            "method": "Multiply",
            "config": {
                "input-parameters": ["energy", "grid/carbon-intensity"],
                "output-parameter": "carbon-operational",
            },
            "parameter-metadata": {
                "inputs": {
                    "energy": _meta(
                        "kWh", "GPU energy of the serving hardware attributed to the requests, PUE included"
                    ),
                    "grid/carbon-intensity": _meta(
                        "gCO2eq/kWh", "location-based grid carbon intensity (I)", time="avg", component="avg"
                    ),
                },
                "outputs": {"carbon-operational": _meta("gCO2eq", "operational emissions O = E x I")},
            },
        },
        "time-share": {
            "path": "builtin",
            "method": "Divide",
            "config": {
                "numerator": "time-reserved",
                "denominator": "device/expected-lifespan",
                "output": "time-share",
            },
            "parameter-metadata": {
                "inputs": {
                    "time-reserved": _meta("s", "hardware seconds attributed to the requests (TR)"),
                    "device/expected-lifespan": _meta(
                        "s", "expected lifespan of the hardware (EL)", time="avg", component="avg"
                    ),
                },
                "outputs": {"time-share": _meta("none", "TR / EL")},
            },
        },
        "resource-share": {
            "path": "builtin",
            "method": "Divide",
            "config": {
                "numerator": "resources-reserved",
                "denominator": "resources-total",
                "output": "resource-share",
            },
            "parameter-metadata": {
                "inputs": {
                    "resources-reserved": _meta(
                        "GPUs", "GPUs the model is served on (RR)", time="avg", component="sum"
                    ),
                    "resources-total": _meta("GPUs", "GPUs in the server (ToR)", time="avg", component="sum"),
                },
                "outputs": {"resource-share": _meta("none", "RR / ToR", time="avg", component="avg")},
            },
        },
        "embodied-carbon": {
            "path": "builtin",
            "method": "Multiply",
            "config": {
                "input-parameters": ["device/emissions-embodied", "time-share", "resource-share"],
                "output-parameter": "carbon-embodied",
            },
            "parameter-metadata": {
                "inputs": {
                    "device/emissions-embodied": _meta(
                        "gCO2eq",
                        "embodied emissions of one whole server: all its GPUs and the rest (TE)",
                        time="avg",
                        component="sum",
                    )
                },
                "outputs": {
                    "carbon-embodied": _meta("gCO2eq", "embodied emissions M = TE x (TR / EL) x (RR / ToR)")
                },
            },
        },
        "sum-carbon": {
            "path": "builtin",
            "method": "Sum",
            "config": {
                "input-parameters": ["carbon-operational", "carbon-embodied"],
                "output-parameter": "carbon",
            },
            "parameter-metadata": {"outputs": {"carbon": _meta("gCO2eq", "O + M")}},
        },
        "functional-unit": {
            "path": "builtin",
            "method": "Divide",
            "config": {"numerator": FU_PARAMETER, "denominator": FU_PER, "output": FU_SCALED},
            "parameter-metadata": {
                "inputs": {
                    FU_PARAMETER: _meta("tokens", "output tokens generated (the functional unit's count)")
                },
                "outputs": {FU_SCALED: _meta("1,000 output tokens", "R: output tokens in thousands")},
            },
        },
        "sci": {
            "path": "builtin",
            "method": "Sci",
            "config": {"functional-unit": FU_SCALED},
            "parameter-metadata": {
                "outputs": {
                    "sci": _meta(
                        "gCO2eq per 1,000 output tokens", "SCI = (O + M) per R", time="avg", component="sum"
                    )
                },
            },
        },
    }


def build_manifest(
    *,
    model: str,
    task: str,
    hardware: str,
    inputs: ManifestInputs,
    scoring_date: str,
    grade: str,
    peers: int,
    percentile: float | None = None,
    sci_version: str = "SCI 1.1",
    scer_version: str = "0.1",
    label_url: str | None = None,
    figures_from: str = LIVE,
    grade_j_per_1k_output_tokens: float | None = None,
    configuration: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest as a mapping (``to_yaml`` writes it). Its aggregate SCI is ``inputs.sci()``.

    ``figures_from`` names where the SCI's inputs come from (``live traffic``: the proxy's ledger;
    ``benchmark``: a bench submission, whose ``configuration`` is copied in); the grade always ranks the
    benchmark's GPU energy per 1,000 output tokens (``grade_j_per_1k_output_tokens``) among ``peers``."""
    defaults = {
        "grid/carbon-intensity": inputs.grid_intensity_g_per_kwh,
        "device/emissions-embodied": inputs.device_emissions_embodied_g,
        "device/expected-lifespan": inputs.expected_lifespan_s,
        "resources-reserved": inputs.resources_reserved,
        "resources-total": inputs.resources_total,
    }
    observation = {
        "timestamp": inputs.timestamp,
        "duration": inputs.duration_s,
        "energy": inputs.energy_kwh,
        "time-reserved": inputs.time_reserved_s,
        FU_PARAMETER: inputs.output_tokens,
    }
    sci = inputs.sci()
    carbon = inputs.carbon_g()
    output = {
        **defaults,
        **observation,
        "carbon-operational": inputs.carbon_operational_g(),
        "time-share": inputs.time_share(),
        "resource-share": inputs.resource_share(),
        "carbon-embodied": inputs.carbon_embodied_g(),
        "carbon": carbon,
        FU_SCALED: inputs.functional_units(),
        "sci": sci,
    }
    aggregated = {"carbon": carbon, "sci": sci}
    scer: dict[str, Any] = {
        "scer-version": scer_version,
        "sci-version": sci_version,
        "model": model,
        "task": task,
        "hardware": hardware,
        "scoring-date": scoring_date,
        "grade": grade,
        "peers": peers,
        "percentile": percentile,
        "functional-unit": {"name": FUNCTIONAL_UNIT, "parameter": FU_PARAMETER, "per": FU_PER},
        "sci": sci,
        "label-value": format_sig3(sci),
        "sci-unit": "gCO2eq per 1,000 output tokens",
        "energy-wh-per-1k-output-tokens": inputs.energy_wh_per_1k_output_tokens(),
        "energy-source": inputs.energy_source,
        "pue": inputs.pue,
        "figures-from": figures_from,
        "grade-basis": {
            "metric": GRADE_METRIC,
            "j-per-1k-output-tokens": grade_j_per_1k_output_tokens,
            "peers": peers,
        },
        "boundary": {"included": list(BOUNDARY_INCLUDED), "excluded": list(BOUNDARY_EXCLUDED)},
    }
    if configuration is not None:
        scer["configuration"] = dict(configuration)
    if label_url is not None:
        scer["label-url"] = label_url
    description = (
        f"SCI of {model} ({task}) on {hardware} from {figures_from}, behind its SCER label scored "
        f"{scoring_date}. The grade ranks {GRADE_METRIC} among {peers} peers. "
        f"Functional unit: {FUNCTIONAL_UNIT}. Follows {sci_version}: SCI = (O + M) per R. "
        "Boundary: in, the serving hardware's GPU energy (measured or estimated, as energy-source says) "
        "with PUE and the GPUs' and server's embodied share; out, client devices, the network and training. "
        "SCER is a draft specification of the Green Software Foundation."
    )
    return {
        "name": f"scer-label {model}",
        "description": description,
        "tags": {"kind": "llm-inference", "complexity": "simple", "category": "scer-label"},
        "aggregation": {"metrics": ["carbon", "sci"], "type": "both"},
        "initialize": {"plugins": _plugins()},
        "tree": {
            "children": {
                model: {
                    "pipeline": {"compute": list(PLUGIN_ORDER)},
                    "defaults": defaults,
                    "inputs": [observation],
                    "outputs": [output],
                    "aggregated": aggregated,
                },
            },
            "aggregated": aggregated,
        },
        "scer": scer,
    }


def manifest_sci(manifest: Mapping[str, Any]) -> float:
    """The aggregate SCI of a manifest built here (``tree.aggregated.sci``)."""
    return float(manifest["tree"]["aggregated"]["sci"])


@dataclass(frozen=True)
class Label:
    """A label and its manifest, built from the same inputs (so their SCI is the same number)."""

    data: LabelData
    manifest: dict[str, Any]

    @property
    def svg(self) -> str:
        return render_label_svg(self.data)

    @property
    def yaml(self) -> str:
        return to_yaml(self.manifest)


def make_label(
    *,
    model: str,
    task: str,
    hardware: str,
    inputs: ManifestInputs,
    scoring_date: str,
    grade: str,
    peers: int,
    base_url: str,
    percentile: float | None = None,
    sci_version: str = "SCI 1.1",
    figures_from: str = LIVE,
    grade_j_per_1k_output_tokens: float | None = None,
    configuration: Mapping[str, Any] | None = None,
) -> Label:
    """The label (``LabelData``) and its manifest; the QR code links to ``manifest_url(base_url, model,
    figures_from)``, which the proxy at ``base_url`` answers with this same manifest."""
    if figures_from not in FIGURES:
        raise ValueError(f"figures_from must be one of {FIGURES}, got {figures_from!r}")
    data = LabelData(
        model=model,
        task=task,
        hardware=hardware,
        scoring_date=scoring_date,
        sci_g_per_1k_output_tokens=inputs.sci(),
        energy_wh_per_1k_output_tokens=inputs.energy_wh_per_1k_output_tokens(),
        grade=grade,
        peers=peers,
        percentile=percentile,
        sci_version=sci_version,
        manifest_url=manifest_url(base_url, model, figures_from),
        energy_source=inputs.energy_source,
        grid_intensity_g_per_kwh=inputs.grid_intensity_g_per_kwh,
        figures_from=figures_from,
        grade_j_per_1k_output_tokens=grade_j_per_1k_output_tokens,
    )
    manifest = build_manifest(
        model=model,
        task=task,
        hardware=hardware,
        inputs=inputs,
        scoring_date=scoring_date,
        grade=grade,
        peers=peers,
        percentile=percentile,
        sci_version=sci_version,
        label_url=label_url(base_url, model, figures_from),
        figures_from=figures_from,
        grade_j_per_1k_output_tokens=grade_j_per_1k_output_tokens,
        configuration=configuration,
    )
    return Label(data=data, manifest=manifest)


# --- a bench submission's label ------------------------------------------------------------------

GRADE_METRIC = "GPU energy per 1,000 output tokens on the SCER standard benchmark"
_REPEAT_KEYS = (
    "energy_j",
    "carbon_operational_g",
    "carbon_embodied_g",
    "output_tokens",
    "started_at",
    "ended_at",
)
_EMBODIED_KEYS = ("gpu_kg", "server_kg", "gpus_per_server", "lifetime_years", "gpus_used")


def hardware_text(devices: Sequence[str]) -> str:
    """'0: NVIDIA H100 80GB HBM3', '1: ...' -> '2 x NVIDIA H100 80GB HBM3'."""
    if not devices:
        return "unknown hardware"
    first = devices[0].split(":", 1)[-1].strip()
    if " x " in first:  # the estimate meter already says "1 x H100 (assumed, not measured)"
        return first
    return f"{len(devices)} x {first}"


def _preset_embodied(hardware: Mapping[str, Any]) -> Embodied:
    """The preset of the submission's GPU family (the H100's when unknown): for submissions written
    before they recorded their configuration."""
    preset = EMBODIED_PRESETS.get(str(hardware.get("gpu_model", "")).lower(), EMBODIED_PRESETS["h100"])
    return Embodied(
        gpu_kg=float(preset["gpu_kg"]),
        server_kg=float(preset["server_kg"]),
        gpus_per_server=int(preset["gpus_per_server"]),
        lifetime_years=float(preset["lifetime_years"]),
        gpus_used=int(hardware.get("gpu_count", 1)),
    )


def inputs_from_submission(submission: Mapping[str, Any]) -> ManifestInputs:
    """The SCI inputs of a bench submission's measured repeats, under the configuration it ran with.

    ``configuration`` (written by ``scer-proxy bench``) gives the PUE, the embodied figures and the grid
    the records were computed with, so the manifest reproduces their carbon. A submission without it
    (older ones): the PUE is its energy over its GPU energy, and the hardware time is the one that gives
    its recorded embodied carbon under its GPU family's preset. ValueError names what is missing."""
    repeats = submission.get("repeats") or []
    if not repeats or not all(isinstance(r, Mapping) and all(k in r for k in _REPEAT_KEYS) for r in repeats):
        raise ValueError("the submission lacks per-repeat energy and carbon figures")
    hardware = submission.get("hardware") or {}
    config = submission.get("configuration") or {}
    energy_j = sum(float(r["energy_j"]) for r in repeats)
    gpu_j = sum(float(r.get("gpu_energy_j") or 0.0) for r in repeats)
    recorded = config.get("embodied")
    if isinstance(recorded, Mapping) and all(k in recorded for k in _EMBODIED_KEYS):
        embodied = Embodied(
            gpu_kg=float(recorded["gpu_kg"]),
            server_kg=float(recorded["server_kg"]),
            gpus_per_server=int(recorded["gpus_per_server"]),
            lifetime_years=float(recorded["lifetime_years"]),
            gpus_used=int(recorded["gpus_used"]),
        )
        hardware_s: float | None = sum(float(r.get("hardware_s") or 0.0) for r in repeats)
    else:
        embodied, hardware_s = _preset_embodied(hardware), None
    pue = config.get("pue")
    if pue is None:
        pue = energy_j / gpu_j if gpu_j > 0 else 1.0
    grid = config.get("grid") or {}
    started = min(float(r["started_at"]) for r in repeats)
    return inputs_from_totals(
        energy_j=energy_j,
        carbon_operational_g=sum(float(r["carbon_operational_g"]) for r in repeats),
        carbon_embodied_g=sum(float(r["carbon_embodied_g"]) for r in repeats),
        output_tokens=sum(int(r["output_tokens"]) for r in repeats),
        hardware_s=hardware_s,
        embodied=embodied,
        started_at=started,
        duration_s=max(float(r["ended_at"]) for r in repeats) - started,
        grid_intensity_g_per_kwh=grid.get("intensity_g_per_kwh"),
        energy_source=str((submission.get("result") or {}).get("energy_source", "")),
        pue=float(pue),
    )


def label_from_submission(submission: Mapping[str, Any], *, rated: Rated | None, base_url: str) -> Label:
    """The benchmark label of a submission: its SCI (the one its result states) and energy under the
    configuration it ran with, graded by ``rated``; the QR code links to the proxy's manifest of the
    same submission (``?from=benchmark``)."""
    inputs = inputs_from_submission(submission)
    hardware = submission.get("hardware") or {}
    devices = [str(d) for d in hardware.get("devices") or []]
    category = submission.get("category") or {}
    return make_label(
        model=str(submission["model"]),
        task=str(category.get("task", "chat")),
        hardware=hardware_text(devices)
        if devices
        else f"{hardware.get('gpu_count', 1)} x {hardware.get('gpu_model', 'GPU')}",
        inputs=inputs,
        scoring_date=str(submission.get("created_at", ""))[:10],
        grade=rated.grade if rated else "unrated",
        peers=rated.peers if rated else 0,
        percentile=rated.percentile if rated else None,
        base_url=base_url,
        figures_from=BENCHMARK,
        grade_j_per_1k_output_tokens=rated.entry.j_per_1k_output_tokens if rated else None,
        configuration=submission.get("configuration"),
    )


# --- YAML writing (no YAML library needed) -------------------------------------------------------

_PLAIN = re.compile(r"^[A-Za-z][A-Za-z0-9_./()-]*(?: [A-Za-z0-9_./()-]+)*$")
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "nan", "inf"}
# YAML 1.2 (7.4.2, 8.2.2) restricts an implicit key to one line of at most 1024 characters; PyYAML
# and js-yaml (which the Impact Framework reads with) refuse a longer one. Kept a little below.
_IMPLICIT_KEY_MAX = 1000
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r", "\0": "\\0"}


def yaml_string(text: str) -> str:
    """A YAML scalar for ``text``: plain when unambiguous, otherwise double-quoted with escapes."""
    if _PLAIN.match(text) and text.lower() not in _RESERVED:
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif (
            code < 0x20
            or 0x7F <= code <= 0x9F
            or code in (0x2028, 0x2029, 0xFEFF)
            or 0xD800 <= code <= 0xDFFF
        ):
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def yaml_number(value: float) -> str:
    """A float as a plain decimal that parses back to the same float (YAML 1.1 and 1.2 alike)."""
    if not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
    text = format(Decimal(repr(value)), "f")
    return text if "." in text else text + ".0"


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return yaml_number(value)
    if isinstance(value, str):
        return yaml_string(value)
    raise TypeError(f"cannot write {type(value).__name__} as YAML")


def _emit(value: Any, indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    if isinstance(value, Mapping):
        for key, item in value.items():
            k = yaml_string(str(key))
            # A key longer than YAML allows an implicit one (a long model name) is written explicit.
            head = f"{pad}{k}:" if len(k) <= _IMPLICIT_KEY_MAX else f"{pad}? {k}\n{pad}:"
            if isinstance(item, Mapping) and item:
                lines.append(head)
                _emit(item, indent + 1, lines)
            elif isinstance(item, Sequence) and not isinstance(item, str) and item:
                lines.append(head)
                _emit(item, indent + 1, lines)
            else:
                lines.append(f"{head} {_inline(item)}")
    else:
        for item in value:
            if isinstance(item, Mapping) and item:
                sub: list[str] = []
                _emit(item, indent + 1, sub)
                first = sub[0].lstrip(" ")
                lines.append(f"{pad}- {first}")
                lines.extend(sub[1:])
            elif isinstance(item, Sequence) and not isinstance(item, str) and item:
                sub = []
                _emit(item, indent + 1, sub)
                lines.append(f"{pad}- {sub[0].lstrip(' ')}")
                lines.extend(sub[1:])
            else:
                lines.append(f"{pad}- {_inline(item)}")


def _inline(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, Sequence) and not isinstance(value, str):
        return "[]"
    return _scalar(value)


def to_yaml(manifest: Mapping[str, Any]) -> str:
    """The manifest as YAML text (block style, two-space indent, UTF-8 without a byte order mark)."""
    lines: list[str] = ["# Impact Framework manifest of a SCER label, written by scer-proxy"]
    _emit(manifest, 0, lines)
    return "\n".join(lines) + "\n"
