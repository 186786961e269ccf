"""The estimator: energy from token counts, model size and concurrency, where no counter exists.

Always labelled ``estimate`` and never presented as a measurement; the model is
:mod:`scer_proxy.attribution.energy_model`.
"""

from __future__ import annotations

from typing import Any

from scer_proxy.attribution.energy_model import fitted_model, j_per_prompt_token, model_size_b
from scer_proxy.meters import Estimate


class TokenEstimator:
    """Each request's energy estimated at its end from its tokens (settled at once)."""

    source = "estimate"

    def __init__(self, *, gpu: str = "H100", gpus: int = 1, configured_params_b: float = 0.0) -> None:
        self.gpu = gpu
        self.gpus = max(1, gpus)
        self.configured_params_b = configured_params_b
        self.model = fitted_model()

    @property
    def uncertainty_rel(self) -> float:
        return self.model.uncertainty_rel

    def estimate(
        self, *, model: str, prompt_tokens: int, completion_tokens: int, concurrency: float, duration_s: float
    ) -> Estimate:
        params_b, total_b, params_source = model_size_b(model, self.configured_params_b)
        decode_j = completion_tokens * self.model.j_per_output_token(
            params_b, concurrency, self.gpu, self.gpus, total_b
        )
        prefill_j = prompt_tokens * j_per_prompt_token(params_b, self.gpu)  # per GPU and for all alike
        # Hardware time: the request's duration shared with the requests running beside it.
        hw_s = duration_s / max(concurrency, 1.0)
        flags = ("model_size_assumed",) if params_source == "assumed" else ()
        return Estimate(prefill_j, decode_j, hw_s, flags)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "estimate",
            "devices": [f"{self.gpus} x {self.gpu} (assumed, not measured)"],
            "method": "ML.ENERGY v3 fit of J per output token on model size, batch and GPUs, plus prefill",
            "uncertainty_rel": round(self.model.uncertainty_rel, 3),
            "fit_rows": self.model.rows,
        }
