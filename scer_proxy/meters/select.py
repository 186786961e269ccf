"""The choice of an upstream's energy source: the configured meter, or for ``auto`` the first that answers;
and the grouping of upstreams whose meters read the same boards, which must share one meter.

Two upstreams on one GPU (``gpus = [0]`` twice, an index and the UUID of one board, two MIG devices of
one board, two upstream configurations of one server with the ``simulated`` meter, two upstreams on
RAPL) would each measure the whole counter: together twice what it counted. :func:`share_hardware`
groups them (overlapping GPU sets too: ``[0, 1]`` and ``[1, 2]`` form one group over ``[0, 1, 2]``),
so that one timeline splits the group's energy among all their requests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import aiohttp
import structlog

from scer_proxy.config import Config, UpstreamConfig
from scer_proxy.meters import Estimator, Meter, MeterError
from scer_proxy.meters.dcgm import ENERGY_METRIC, DcgmMeter
from scer_proxy.meters.estimate import TokenEstimator
from scer_proxy.meters.nvml import NvmlMeter, nvml_available
from scer_proxy.meters.rapl import RaplMeter, rapl_available

log = structlog.get_logger("scer_proxy.meter")


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


@dataclass(frozen=True)
class Group:
    """Upstreams (in configuration order) measured by one choice: one upstream, or those sharing boards."""

    names: tuple[str, ...]
    choice: Choice


def hardware_keys(meter: Meter) -> frozenset[str]:
    """What ``meter`` measures, as keys that two meters of the same hardware share (a meter that cannot
    say shares only with itself)."""
    keys = getattr(meter, "hardware_keys", None)
    return frozenset(keys()) if callable(keys) else frozenset({f"meter:{id(meter)}"})


def connected(keys: Mapping[str, frozenset[str]]) -> list[tuple[str, ...]]:
    """The groups of names whose key sets are linked by common keys (in the mapping's order)."""
    groups: list[tuple[list[str], set[str]]] = []
    for name, own in keys.items():
        joined = [g for g in groups if g[1] & own]
        merged = ([n for g in joined for n in g[0]] + [name], set(own).union(*(g[1] for g in joined)))
        groups = [g for g in groups if g not in joined] + [merged]
    order = list(keys)
    return sorted((tuple(sorted(g[0], key=order.index)) for g in groups), key=lambda g: order.index(g[0]))


async def share_hardware(choices: Mapping[str, Choice]) -> list[Group]:
    """Group the upstreams whose meters read common hardware; each group gets one meter.

    With several measured upstreams, every meter that names its hardware is read once first, so that its
    boards are known by UUID (an index in one upstream and the UUID in another, or MIG devices, name the
    same board only then; a meter that cannot be read yet is known by its configured addresses). Meters
    of one group over the same boards: the first is kept; over overlapping sets: one new meter over
    their union (``widened``) replaces them. Unused meters are closed. Upstreams with an estimator or
    nothing stay alone."""
    keys: dict[str, frozenset[str]] = {}
    measured = {name: c.meter for name, c in choices.items() if c.meter is not None}
    for name, meter in measured.items():
        if len(measured) > 1 and callable(getattr(meter, "hardware_keys", None)):
            with contextlib.suppress(MeterError):
                await meter.read()
        keys[name] = hardware_keys(meter)
    grouped = {names[0]: names for names in connected(keys)}
    out: list[Group] = []
    for name, choice in choices.items():
        if choice.meter is None:
            out.append(Group((name,), choice))
        elif name in grouped:
            names = grouped[name]
            out.append(Group(names, choice if len(names) == 1 else await _one_meter(names, choices, keys)))
    return out


async def _one_meter(
    names: tuple[str, ...], choices: Mapping[str, Choice], keys: Mapping[str, frozenset[str]]
) -> Choice:
    """One meter for upstreams that share boards: the first's when they all read the same, else one over
    the union of their GPUs; the others are closed."""
    meters = [choices[n].meter for n in names]
    first = meters[0]
    assert first is not None
    boards = sorted(set().union(*(keys[n] for n in names)))
    meter: Meter = first
    if any(_boards(keys[n]) != _boards(keys[names[0]]) for n in names):
        meter = _widened(names, [m for m in meters if m is not None])
    for other in {id(m): m for m in meters if m is not None and m is not meter}.values():
        await other.close()
    log.warning(
        "upstreams_share_hardware",
        upstreams=list(names),
        boards=boards,
        note="one meter and one timeline split the boards' energy among all their requests",
    )
    note = f"{choices[names[0]].note}; shared by {', '.join(names)} (one timeline for their boards)"
    return Choice(meter, None, note)


def _boards(keys: frozenset[str]) -> frozenset[str]:
    """The boards among a meter's keys: their UUIDs where known (its addresses may differ: an index, a
    UUID, a MIG device), else all its keys."""
    return frozenset(k for k in keys if k.startswith("gpu:")) or keys


def _widened(names: tuple[str, ...], meters: list[Meter]) -> Meter:
    """A meter over the union of the GPUs of ``meters`` (all of one kind and, for DCGM, one page)."""
    nvml = [m for m in meters if isinstance(m, NvmlMeter)]
    dcgm = [m for m in meters if isinstance(m, DcgmMeter)]
    if len(nvml) == len(meters):
        return nvml[0].widened(_union(m.gpus for m in nvml))
    if len(dcgm) == len(meters) and len({(m.url, m.hostname, m.source) for m in dcgm}) == 1:
        every = any(not m.gpus for m in dcgm)  # one of them reads every GPU of the page
        return dcgm[0].widened(() if every else _union(m.gpus for m in dcgm))
    raise ValueError(
        f"upstreams {', '.join(names)} share GPUs through different meters "
        f"({', '.join(sorted({m.source for m in meters}))}): give them one meter kind and one exporter"
    )


def _union(address_sets: Iterable[tuple[int | str, ...]]) -> tuple[int | str, ...]:
    """The addresses of every set, each once, in order of first appearance."""
    out: dict[str, int | str] = {}
    for addresses in address_sets:
        for address in addresses:
            out.setdefault(str(address), address)
    return tuple(out.values())
