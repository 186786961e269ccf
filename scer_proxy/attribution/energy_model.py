"""Energy per token modelled from model size, batch and GPUs, fitted on the bundled ML.ENERGY data (pure).

In the manner of EcoLogits, on the ML.ENERGY v3 LLM chat rows (H100 and B200, vLLM, Zeus):

    ln(J per output token) = c0 + c1 ln(activated params) + c2 ln(total params) + c3 ln(batch size)
                             + c4 [B200] + c5 ln(GPUs)

(parameters in billions). The residual standard deviation in log space is the stated one-sigma
uncertainty. Prefill is priced per prompt token from first principles: 2 x activated parameters FLOPs
a token at ``PREFILL_MFU`` of the GPU's dense BF16 peak, at the GPU's board power.
"""

from __future__ import annotations

import csv
import functools
import io
import math
import re
from dataclasses import dataclass
from importlib import resources

from scer_proxy.attribution.fitting import least_squares

GPU_PEAK_FLOPS = {"H100": 989e12, "B200": 2250e12}
GPU_BOARD_POWER_W = {"H100": 700.0, "B200": 1000.0}
PREFILL_MFU = 0.5
ASSUMED_PARAMS_B = 8.0


@dataclass(frozen=True)
class EnergyModel:
    coef: tuple[float, ...]
    sigma_log: float
    rows: int

    def j_per_output_token(
        self, params_b: float, batch: float, gpu: str, gpus: int, total_params_b: float | None = None
    ) -> float:
        return math.exp(
            sum(
                c * f
                for c, f in zip(
                    self.coef, _features(params_b, total_params_b or params_b, batch, gpu, gpus), strict=True
                )
            )
        )

    @property
    def uncertainty_rel(self) -> float:
        return math.exp(self.sigma_log) - 1.0


def j_per_prompt_token(params_b: float, gpu: str) -> float:
    flops = GPU_PEAK_FLOPS.get(gpu, GPU_PEAK_FLOPS["H100"]) * PREFILL_MFU
    power = GPU_BOARD_POWER_W.get(gpu, GPU_BOARD_POWER_W["H100"])
    return power * 2.0 * params_b * 1e9 / flops


def _rows() -> list[dict[str, str]]:
    text = (resources.files("scer_proxy") / "data" / "mlenergy-v3-llm.csv").read_text(encoding="utf-8")
    return [r for r in csv.DictReader(io.StringIO(text)) if r["task"] == "lm-arena-chat"]


def _features(params_b: float, total_params_b: float, batch: float, gpu: str, gpus: int) -> list[float]:
    return [
        1.0,
        math.log(max(params_b, 0.1)),
        math.log(max(total_params_b, params_b, 0.1)),
        math.log(max(batch, 1.0)),
        1.0 if gpu == "B200" else 0.0,
        math.log(max(gpus, 1)),
    ]


@functools.cache
def fitted_model() -> EnergyModel:
    rows = _rows()
    x = [
        _features(
            float(r["activated_params_billions"]),
            float(r["total_params_billions"]),
            float(r["avg_batch_size"]),
            r["gpu_model"],
            int(r["num_gpus"]),
        )
        for r in rows
    ]
    y = [math.log(float(r["energy_per_token_joules"])) for r in rows]
    coef, sigma = least_squares(x, y)
    return EnergyModel(tuple(coef), sigma, len(rows))


@functools.cache
def known_models() -> dict[str, tuple[float, float]]:
    """Lower-cased model names (full id and the part after '/') -> (activated, total) parameters, B."""
    out: dict[str, tuple[float, float]] = {}
    for row in _rows():
        params = (float(row["activated_params_billions"]), float(row["total_params_billions"]))
        model_id = row["model_id"].lower()
        out[model_id] = params
        out[model_id.split("/")[-1]] = params
    return out


_SIZE_IN_NAME = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)\s*b(?![a-z])", re.IGNORECASE)


def model_size_b(model: str, configured_b: float = 0.0) -> tuple[float, float, str]:
    """(activated, total parameters in billions, where they came from): the configured size, else the
    bundled table, else a size written in the name ("...-7B-..."), else ``ASSUMED_PARAMS_B``."""
    if configured_b > 0:
        return configured_b, configured_b, "configured"
    name = model.lower()
    table = known_models()
    for key in (name, name.split("/")[-1]):
        if key in table:
            return (*table[key], "table")
    match = _SIZE_IN_NAME.search(name.split("/")[-1])
    if match:
        return float(match.group(1)), float(match.group(1)), "name"
    return ASSUMED_PARAMS_B, ASSUMED_PARAMS_B, "assumed"


def model_params_b(model: str, configured_b: float = 0.0) -> tuple[float, str]:
    """(activated parameters in billions, where that came from)."""
    active, _total, source = model_size_b(model, configured_b)
    return active, source
