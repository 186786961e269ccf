"""Embodied-emission presets per hardware: kgCO2e a GPU, kgCO2e a server without its GPUs, GPUs a
server, and lifetime in years.

Sources:
- h100: NVIDIA HGX H100 product carbon footprint (8 GPUs on one board), 164 kg a GPU, as EcoLogits
  uses it; the server without GPUs and the 4-year lifetime as in Luccioni et al. (2022) and the SCI
  examples.
- h200: no product carbon footprint is published; taken equal to the H100's (same die, more HBM).
- a100: Luccioni, Viguier, Ligozat (2022), "Estimating the carbon footprint of BLOOM": 150 kg an
  A100, 2,500 kg a server, 6 years.
- b200: NVIDIA (2025), "NVIDIA HGX B200 reduces embodied carbon emissions intensity": per FP16
  exaflop the HGX B200 embodies 24 % less than the HGX H100 at 2.3x its throughput, so about
  164 x 2.3 x 0.76 = 287 kg a GPU (derived from those two published ratios).
- cpu-server: a CPU-only server (llama.cpp on CPUs); the whole server is the unit, no GPU.
"""

from __future__ import annotations

EMBODIED_PRESETS: dict[str, dict[str, float | int]] = {
    "h100": {"gpu_kg": 164.0, "server_kg": 2500.0, "gpus_per_server": 8, "lifetime_years": 4.0},
    "h200": {"gpu_kg": 164.0, "server_kg": 2500.0, "gpus_per_server": 8, "lifetime_years": 4.0},
    "a100": {"gpu_kg": 150.0, "server_kg": 2500.0, "gpus_per_server": 8, "lifetime_years": 6.0},
    "b200": {"gpu_kg": 287.0, "server_kg": 2500.0, "gpus_per_server": 8, "lifetime_years": 4.0},
    "cpu-server": {"gpu_kg": 0.0, "server_kg": 2500.0, "gpus_per_server": 1, "lifetime_years": 4.0},
}
