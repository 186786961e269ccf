"""Hardware profiles of the simulated GPU server, built from the bundled ML.ENERGY v3 measurements.

Each profile is one (model, GPU model, GPU count) configuration of the ``lm-arena-chat`` task of
the ML.ENERGY Leaderboard v3.0 (``scer_proxy/data/mlenergy-v3-llm.csv``). Every row of that task
is one steady-state vLLM run at a fixed ``max_num_seqs``; from it we take a *batch point*:

* batch size = ``avg_batch_size`` (the measured mean number of running sequences),
* decode step time = ``median_itl_ms / 1000`` (one step produces one token per running sequence,
  so the inter-token latency is the step time),
* power = ``avg_power_watts`` (all GPUs of the configuration together).

Between batch points the step time and power are interpolated linearly in the batch size, and
clamped to the nearest measured point outside the measured range (below the smallest batch the
GPU is taken to behave as at the smallest measured batch: ML.ENERGY did not measure batch 1).

Three quantities are not in the data and are derived by stated assumptions:

* ``idle_power_w``: per GPU, about 70 W for an H100 SXM5 and about 140 W for a B200, times the
  GPU count. These are typical ``nvidia-smi`` readings of an idle GPU with persistence mode on in
  an HGX baseboard (H100 SXM idles between roughly 60 and 75 W; B200 at roughly twice that). They
  are assumptions, not measurements from the dataset.
* ``prefill_tokens_per_s``: a dense forward pass costs ``2 x activated parameters`` FLOPs per
  token (Kaplan et al., 2020, "Scaling Laws for Neural Language Models", section 2.1; attention
  FLOPs are neglected). Prefill is compute bound, so throughput = ``PREFILL_MFU x peak x num_gpus /
  (2 x params)`` with ``PREFILL_MFU = 0.5`` (large-prompt prefill in vLLM typically reaches 40-60 %
  model FLOPs utilisation) and the dense (non-sparse) tensor-core peak from NVIDIA's datasheets:
  H100 SXM5 989 TFLOPS BF16 / 1,979 TFLOPS FP8; B200 (HGX B200) 2,250 TFLOPS BF16 / 4,500 TFLOPS FP8.
  For Llama-3.1-8B on one H100 that gives about 31,000 prompt tokens per second.
* ``prefill_power_w``: compute-bound prefill runs the GPUs near their limit, so it is taken as the
  highest ``avg_power_watts`` measured for the configuration (the large-batch rows).

``max_model_len`` comes from each model's published context length (``max_position_embeddings``
of its Hugging Face config), which is vLLM's default.

Profile names follow one rule: the model id's name part (after ``/``) in lower case with the
token ``-instruct`` removed, then ``-`` and the GPU model in lower case, then ``x<count>`` when more
than one GPU is used: ``meta-llama/Llama-3.1-70B-Instruct`` on 4 x H100 is ``llama-3.1-70b-h100x4``.
"""

from __future__ import annotations

import csv
import functools
import io
import itertools
import math
from dataclasses import dataclass
from importlib import resources

DEFAULT_PROFILE = "llama-3.1-8b-h100"
TASK = "lm-arena-chat"
PREFILL_MFU = 0.5

# Dense tensor-core peak per GPU in FLOP/s, by GPU model and weight precision class.
_PEAK_FLOPS_BF16: dict[str, float] = {"H100": 989e12, "B200": 2250e12}
_IDLE_POWER_W_PER_GPU: dict[str, float] = {"H100": 70.0, "B200": 140.0}
_DEFAULT_IDLE_POWER_W_PER_GPU = 70.0
_GPU_PRODUCT_NAMES: dict[str, str] = {"H100": "NVIDIA H100 80GB HBM3", "B200": "NVIDIA B200"}

# Published context lengths (max_position_embeddings), matched by model id prefix; first match wins.
_MAX_MODEL_LEN: tuple[tuple[str, int], ...] = (
    ("meta-llama/Llama-3.1-", 131072),
    ("meta-llama/Llama-3.3-", 131072),
    ("meta-llama/Llama-4-Scout-", 10485760),
    ("meta-llama/Llama-4-Maverick-", 1048576),
    ("Qwen/Qwen3-235B-A22B-Instruct-2507", 262144),
    ("Qwen/Qwen3-30B-A3B-Instruct-2507", 262144),
    ("Qwen/Qwen3-", 40960),
    ("google/gemma-3-", 131072),
    ("deepseek-ai/DeepSeek-V3", 163840),
    ("nvidia/NVIDIA-Nemotron-Nano-", 131072),
)
_DEFAULT_MAX_MODEL_LEN = 32768


@dataclass(frozen=True, slots=True)
class Profile:
    """A simulated inference server: one model on a set of GPUs, with measured batch behaviour.

    ``batch_points`` holds ``(batch_size, step_time_s, power_w)`` sorted by batch size; power is
    for all ``num_gpus`` GPUs together.
    """

    name: str
    model_id: str
    params_b: float
    gpu_model: str
    num_gpus: int
    max_num_seqs: int
    batch_points: tuple[tuple[float, float, float], ...]
    idle_power_w: float
    prefill_tokens_per_s: float
    prefill_power_w: float
    max_model_len: int

    def __post_init__(self) -> None:
        if not self.batch_points:
            raise ValueError(f"profile {self.name!r} has no batch points")
        batches = [p[0] for p in self.batch_points]
        if batches != sorted(batches) or len(set(batches)) != len(batches):
            raise ValueError(f"profile {self.name!r}: batch points must be strictly increasing in batch size")
        if self.max_num_seqs < 1 or self.num_gpus < 1 or self.max_model_len < 1:
            raise ValueError(f"profile {self.name!r}: max_num_seqs, num_gpus and max_model_len must be >= 1")
        if self.prefill_tokens_per_s <= 0:
            raise ValueError(f"profile {self.name!r}: prefill_tokens_per_s must be > 0")

    def _interpolate(self, batch: float, column: int) -> float:
        points = self.batch_points
        if batch <= points[0][0]:
            return points[0][column]
        if batch >= points[-1][0]:
            return points[-1][column]
        for lo, hi in itertools.pairwise(points):
            if batch <= hi[0]:
                frac = (batch - lo[0]) / (hi[0] - lo[0])
                return lo[column] + frac * (hi[column] - lo[column])
        return points[-1][column]  # unreachable: the clamp above covers it

    def step_time_s(self, batch: float) -> float:
        """Duration of one decode step with ``batch`` running sequences (linear, clamped)."""
        return self._interpolate(batch, 1)

    def power_w(self, batch: float) -> float:
        """Power of all the profile's GPUs during a decode step of ``batch`` sequences (linear, clamped)."""
        return self._interpolate(batch, 2)

    @property
    def gpu_product_name(self) -> str:
        """The GPU's product name as NVML/DCGM report it (``modelName`` label)."""
        return _GPU_PRODUCT_NAMES.get(self.gpu_model, f"NVIDIA {self.gpu_model}")

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "model_id": self.model_id,
            "params_b": self.params_b,
            "gpu_model": self.gpu_model,
            "num_gpus": self.num_gpus,
            "max_num_seqs": self.max_num_seqs,
            "batch_points": [list(p) for p in self.batch_points],
            "idle_power_w": self.idle_power_w,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "prefill_power_w": self.prefill_power_w,
            "max_model_len": self.max_model_len,
        }


def profile_name(model_id: str, gpu_model: str, num_gpus: int) -> str:
    """The naming rule: ``<model name, lower case, without -instruct>-<gpu>[x<count>]``."""
    base = model_id.rsplit("/", 1)[-1].lower().replace("-instruct", "")
    suffix = gpu_model.lower() + (f"x{num_gpus}" if num_gpus > 1 else "")
    return f"{base}-{suffix}"


def max_model_len_for(model_id: str) -> int:
    for prefix, length in _MAX_MODEL_LEN:
        if model_id.startswith(prefix):
            return length
    return _DEFAULT_MAX_MODEL_LEN


def prefill_tokens_per_s_for(
    activated_params_b: float, gpu_model: str, num_gpus: int, precision: str
) -> float:
    """Compute-bound prefill throughput: ``PREFILL_MFU x peak x num_gpus / (2 x params)``."""
    peak = _PEAK_FLOPS_BF16.get(gpu_model, _PEAK_FLOPS_BF16["H100"])
    if precision.lower() == "fp8":  # FP8 weights run on the FP8 tensor cores, twice the BF16 peak
        peak *= 2.0
    return PREFILL_MFU * peak * num_gpus / (2.0 * activated_params_b * 1e9)


def _read_rows() -> list[dict[str, str]]:
    text = (resources.files("scer_proxy") / "data" / "mlenergy-v3-llm.csv").read_text(encoding="utf-8")
    return [row for row in csv.DictReader(io.StringIO(text)) if row["task"] == TASK]


@functools.cache
def _profiles() -> dict[str, Profile]:
    groups: dict[tuple[str, str, int], list[dict[str, str]]] = {}
    for row in _read_rows():
        key = (row["model_id"], row["gpu_model"], int(row["num_gpus"]))
        groups.setdefault(key, []).append(row)
    profiles: dict[str, Profile] = {}
    for (model_id, gpu_model, num_gpus), rows in sorted(groups.items()):
        name = profile_name(model_id, gpu_model, num_gpus)
        if name in profiles:
            raise RuntimeError(f"profile naming rule is ambiguous: {name!r}")
        by_batch: dict[float, tuple[float, float, float]] = {}
        for row in rows:
            batch = float(row["avg_batch_size"])
            by_batch[batch] = (batch, float(row["median_itl_ms"]) / 1000.0, float(row["avg_power_watts"]))
        points = tuple(by_batch[b] for b in sorted(by_batch))
        first = rows[0]
        activated_b = float(first["activated_params_billions"] or first["total_params_billions"])
        profiles[name] = Profile(
            name=name,
            model_id=model_id,
            params_b=float(first["total_params_billions"]),
            gpu_model=gpu_model,
            num_gpus=num_gpus,
            max_num_seqs=max(int(r["max_num_seqs"]) for r in rows),
            batch_points=points,
            idle_power_w=_IDLE_POWER_W_PER_GPU.get(gpu_model, _DEFAULT_IDLE_POWER_W_PER_GPU) * num_gpus,
            prefill_tokens_per_s=prefill_tokens_per_s_for(
                activated_b, gpu_model, num_gpus, first["weight_precision"] or "bfloat16"
            ),
            prefill_power_w=max(p[2] for p in points),
            max_model_len=max_model_len_for(model_id),
        )
    for profile in profiles.values():
        assert all(math.isfinite(v) for p in profile.batch_points for v in p)
    return profiles


class UnknownProfileError(KeyError, ValueError):
    """An unknown profile name; the message lists the valid names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown simulator profile"


def list_profiles() -> list[str]:
    """Names of every bundled profile, sorted."""
    return sorted(_profiles())


def get_profile(name: str = DEFAULT_PROFILE) -> Profile:
    """The named profile; raises ``UnknownProfileError`` (a ``KeyError`` and ``ValueError``) naming
    the valid profiles when ``name`` is unknown."""
    try:
        return _profiles()[name]
    except KeyError:
        raise UnknownProfileError(
            f"unknown simulator profile {name!r}; valid profiles: {', '.join(list_profiles())}"
        ) from None
