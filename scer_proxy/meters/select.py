"""The choice of an upstream's energy source: the configured meter, or for ``auto`` the first that answers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp

from scer_proxy.config import Config, UpstreamConfig
from scer_proxy.meters import Estimator, Meter
from scer_proxy.meters.dcgm import ENERGY_METRIC, DcgmMeter
from scer_proxy.meters.estimate import TokenEstimator
from scer_proxy.meters.nvml import NvmlMeter, nvml_available
from scer_proxy.meters.rapl import RaplMeter, rapl_available


@dataclass(frozen=True)
class Choice:
    """A meter, or an estimator where no counter can be read, and why (shown in health and the summary)."""

    meter: Meter | None
    estimator: Estimator | None
    note: str


async def build_meter(config: Config, upstream: UpstreamConfig) -> Choice:
    kind = config.meter.kind
    cfg = config.meter
    if kind == "dcgm":
        return _measured(
            DcgmMeter(cfg.dcgm_url, gpus=upstream.gpus, source="dcgm", hostname=cfg.dcgm_hostname),
            "configured: DCGM exporter",
        )
    if kind == "simulated":
        return _measured(
            DcgmMeter(upstream.url + "/metrics", source="simulated"), "configured: the upstream's own counter"
        )
    if kind == "nvml":
        return _measured(NvmlMeter(upstream.gpus), "configured: NVML")
    if kind == "rapl":
        return _measured(RaplMeter(cfg.rapl_root, dram=cfg.rapl_dram), "configured: RAPL")
    if kind == "estimate":
        return _estimated(config, upstream, "configured: estimate (no counter)")
    # auto: a GPU through NVML, else a DCGM-style counter the upstream itself exposes (the simulator),
    # else RAPL where readable, else the estimate, saying why at each step.
    if await asyncio.to_thread(nvml_available):
        return _measured(NvmlMeter(upstream.gpus), "auto: NVML answered")
    if await _probe_simulated(upstream.url):
        return _measured(
            DcgmMeter(upstream.url + "/metrics", source="simulated"),
            "auto: the upstream exposes a DCGM counter",
        )
    if rapl_available(cfg.rapl_root):
        return _measured(
            RaplMeter(cfg.rapl_root, dram=cfg.rapl_dram), "auto: no GPU answered NVML; RAPL is readable"
        )
    return _estimated(config, upstream, "auto: no GPU answered NVML and RAPL is not readable: estimating")


async def _probe_simulated(url: str) -> bool:
    """Does this upstream expose a DCGM-style energy counter at its own /metrics (the simulator does)?"""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            async with session.get(url + "/metrics") as resp:
                return resp.status == 200 and ENERGY_METRIC in await resp.text()
    except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
        return False


def _measured(meter: Meter, note: str) -> Choice:
    return Choice(meter, None, note)


def _estimated(config: Config, upstream: UpstreamConfig, note: str) -> Choice:
    estimator = TokenEstimator(
        gpu=config.meter.estimate_gpu,
        gpus=len(upstream.gpus),
        configured_params_b=config.rating.model_params_b,
    )
    return Choice(None, estimator, note)
