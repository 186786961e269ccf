"""The SCER standard benchmark, pure parts: the workload, each repeat's figures, the submission.

The runner that drives the workload through a proxy is ``scer_proxy.cli.bench``. A repeat's energy is
the settled ledger records of its requests (GPU energy, before PUE). The submission records the
workload id and hash, the hardware (GPU names from the meter), the server (``/v1/models`` and its
``Server`` header), the meter kind, the configuration the records were computed under (PUE, embodied
figures, grid intensity and its source, from the proxy's ``/scer/health`` and the records), each
repeat's figures and their spread, and the SCI: the measured repeats' carbon per 1,000 output tokens,
computed as its manifest computes it (``scer_proxy.scer.manifest.inputs_from_submission``), so that the
label, the manifest and the submission state the same number.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

from scer_proxy import __version__
from scer_proxy.attribution.energy_model import model_size_b
from scer_proxy.carbon.sci import JOULES_PER_KWH
from scer_proxy.scer.manifest import inputs_from_submission
from scer_proxy.scer.rating import Category, gpu_family

SCER_VERSION = "SCER 0.1 (draft)"
SCI_VERSION = "SCI 1.1"


class BenchError(Exception):
    """The benchmark could not run or measured nothing; a message starting with a flag is bad usage."""


@dataclass(frozen=True)
class Workload:
    id: str
    version: int
    sha256: str
    max_tokens: int
    ignore_eos: bool
    concurrency: int
    prompts: tuple[dict[str, Any], ...]


def load_workload(name: str) -> Workload:
    path = resources.files("scer_proxy") / "workloads" / f"{name}.json"
    if not path.is_file():
        available = sorted(
            p.name.removesuffix(".json")
            for p in (resources.files("scer_proxy") / "workloads").iterdir()
            if p.name.endswith(".json")
        )
        raise BenchError(f"--workload: unknown workload {name!r} (available: {', '.join(available)})")
    raw = path.read_bytes()
    data = json.loads(raw)
    return Workload(
        id=data["id"],
        version=int(data["version"]),
        sha256=hashlib.sha256(raw).hexdigest(),
        max_tokens=int(data["max_tokens"]),
        ignore_eos=bool(data["ignore_eos"]),
        concurrency=int(data["concurrency"]),
        prompts=tuple(data["prompts"]),
    )


def server_params_b(models: list[Any], model: str) -> float | None:
    """The model's size from the server's ``/v1/models`` metadata where it has it (llama.cpp reports
    ``meta.n_params``), in billions; None otherwise."""
    for entry in models:
        if isinstance(entry, dict) and entry.get("id") == model and isinstance(entry.get("meta"), dict):
            n_params = entry["meta"].get("n_params")
            if isinstance(n_params, int | float) and n_params > 0:
                return float(n_params) / 1e9
    return None


def _hardware(meter: dict[str, Any]) -> tuple[str, int, list[str]]:
    """GPU model family and count from the meter's device list (e.g. '0: NVIDIA H100 80GB HBM3')."""
    devices = [str(d) for d in meter.get("devices") or []]
    if not devices:
        return "unknown", 1, devices
    if meter.get("kind") == "estimate" and " x " in devices[0]:
        count, _, rest = devices[0].partition(" x ")
        return gpu_family(rest), int(count) if count.isdigit() else 1, devices
    return gpu_family(devices[0].split(":", 1)[-1]), len(devices), devices


def repeat_figures(records: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    output = sum(int(r["completion_tokens"]) for r in records)
    gpu_j = sum(float(r.get("energy_gpu_j") or 0.0) for r in records)

    def total(key: str) -> float:
        return sum(float(r.get(key) or 0.0) for r in records)

    carbon = sum(float(r.get("carbon_g") or 0.0) for r in records)
    sources = {r.get("energy_source") for r in records}
    if output <= 0:
        raise BenchError("the benchmark produced no output tokens")
    return {
        "requests": len(records),
        "prompt_tokens": sum(int(r["prompt_tokens"]) for r in records),
        "output_tokens": output,
        "gpu_energy_j": gpu_j,
        "energy_j": total("energy_j"),  # PUE included
        "carbon_operational_g": total("carbon_operational_g"),
        "carbon_embodied_g": total("carbon_embodied_g"),
        "hardware_s": total("hardware_s"),
        "started_at": min(float(r["started_at"]) for r in records),
        "ended_at": max(float(r.get("ended_at") or r["started_at"]) for r in records),
        "j_per_1k_output_tokens": gpu_j * 1000.0 / output,
        "carbon_g": carbon,
        "sci_g_per_1k_output_tokens": carbon * 1000.0 / output,
        "grid_intensity_g_per_kwh": records[0].get("grid_intensity_g_per_kwh"),
        "grid_sources": sorted({str(r.get("grid_source") or "") for r in records}),
        "upstreams": sorted({str(r.get("upstream") or "") for r in records}),
        "energy_source": ",".join(sorted(str(s) for s in sources)),
        "wall_s": wall_s,
        "output_tokens_per_s": output / wall_s if wall_s > 0 else None,
    }


def configuration(carbon: dict[str, Any] | None, figures: list[dict[str, Any]]) -> dict[str, Any]:
    """The configuration the repeats' records were computed under: the PUE and the embodied figures of
    their upstream (from the proxy's ``/scer/health`` ``carbon``), the grid intensity they applied (their
    operational carbon over their energy) and its sources. Without ``carbon`` (an older proxy) the PUE is
    the records' energy over their GPU energy and the embodied figures are null."""
    carbon = carbon or {}
    upstreams = sorted({u for f in figures for u in f.get("upstreams", [])})
    energy_j = sum(float(f["energy_j"]) for f in figures)
    gpu_j = sum(float(f["gpu_energy_j"]) for f in figures)
    operational_g = sum(float(f["carbon_operational_g"]) for f in figures)
    pue = carbon.get("pue")
    if pue is None:
        pue = energy_j / gpu_j if gpu_j > 0 else 1.0
    per_upstream = carbon.get("embodied") or {}
    embodied = [per_upstream.get(u) for u in upstreams]
    same = bool(embodied) and all(e is not None and e == embodied[0] for e in embodied)
    return {
        "pue": float(pue),
        "embodied": embodied[0] if same else None,
        "grid": {
            "intensity_g_per_kwh": operational_g / (energy_j / JOULES_PER_KWH)
            if energy_j > 0
            else figures[0].get("grid_intensity_g_per_kwh"),
            "sources": sorted({s for f in figures for s in f.get("grid_sources", [])}),
        },
        "idle_policy": carbon.get("idle_policy"),
        "upstreams": upstreams,
    }


def submission(
    *,
    model: str,
    workload: Workload,
    requests: int,
    concurrency: int,
    task: str,
    params_b: float,
    listed: list[Any],
    server_header: str | None,
    meter: dict[str, Any],
    figures: list[dict[str, Any]],
    carbon: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The submission of a run: ``listed`` is the server's ``/v1/models`` data, ``meter`` and ``carbon``
    the proxy's ``/scer/health`` ones, ``figures`` the measured repeats' :func:`repeat_figures`."""
    gpu_model, gpu_count, devices = _hardware(meter)
    served_b = server_params_b(listed, model)
    if params_b <= 0 and served_b is not None:
        active_b, total_b, size_source = served_b, served_b, "server"
    else:
        active_b, total_b, size_source = model_size_b(model, params_b)
    category = Category.of(task, total_b, gpu_model, gpu_count)
    per_1k = [f["j_per_1k_output_tokens"] for f in figures]
    mean = statistics.fmean(per_1k)
    out: dict[str, Any] = {
        "scer_version": SCER_VERSION,
        "sci_version": SCI_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tool": f"scer-proxy {__version__}",
        "model": model,
        "category": {
            "task": category.task,
            "size_class": category.size_class,
            "gpu_model": category.gpu_model,
            "gpu_count": category.gpu_count,
        },
        "model_params_b": {"activated": active_b, "total": total_b, "source": size_source},
        "workload": {
            "id": workload.id,
            "version": workload.version,
            "sha256": workload.sha256,
            "requests_per_repeat": requests,
            "concurrency": concurrency,
            "repeats": len(figures),
            "warmup_repeats_excluded": 1,
            "max_tokens": workload.max_tokens,
            "ignore_eos": workload.ignore_eos,
            "steady_state": "repeats back to back, the queue kept full by excluded fillers",
        },
        "hardware": {"gpu_model": gpu_model, "gpu_count": gpu_count, "devices": devices},
        "server": {
            "models": [m.get("id") for m in listed if isinstance(m, dict)],
            "server_header": server_header,
        },
        "meter": {"kind": meter.get("kind"), "update_period_ms": meter.get("update_period_ms")},
        "configuration": configuration(carbon, figures),
        "repeats": figures,
        "result": {
            "j_per_1k_output_tokens": mean,
            "wh_per_1k_output_tokens": mean / 3600.0,
            "spread_rel": (statistics.pstdev(per_1k) / mean) if mean > 0 else None,
            "min_j_per_1k_output_tokens": min(per_1k),
            "max_j_per_1k_output_tokens": max(per_1k),
            "energy_source": figures[0]["energy_source"],
        },
    }
    # The SCI of all measured repeats together, as the manifest behind the label computes it.
    out["result"]["sci_g_per_1k_output_tokens"] = inputs_from_submission(out).sci()
    return out
