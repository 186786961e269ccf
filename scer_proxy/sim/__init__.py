"""The built-in simulated GPU inference server (``scer-proxy simulate``).

An OpenAI-compatible server whose power and latency against batch size come from the ML.ENERGY v3
measurements (:mod:`.profiles`), driven by a continuous-batching engine with exact ground-truth
energy per request (:mod:`.engine`), served over aiohttp (:mod:`.server`).

The server's names are imported lazily, so that the pure core (profiles, engine, outputs, wire
shapes) can be used without importing aiohttp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scer_proxy.sim.engine import Engine, MeterReading, SeqStatus, Sequence
from scer_proxy.sim.profiles import (
    DEFAULT_PROFILE,
    Profile,
    UnknownProfileError,
    get_profile,
    list_profiles,
    profile_name,
)

if TYPE_CHECKING:
    from scer_proxy.sim.server import SIM_STATE, TRUE_ENERGY_HEADER, SimState, create_sim_app, serve_simulator

_SERVER_NAMES = frozenset(
    {"SIM_STATE", "TRUE_ENERGY_HEADER", "SimState", "create_sim_app", "serve_simulator"}
)


def __getattr__(name: str) -> Any:
    if name in _SERVER_NAMES:
        from scer_proxy.sim import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_PROFILE",
    "SIM_STATE",
    "TRUE_ENERGY_HEADER",
    "Engine",
    "MeterReading",
    "Profile",
    "SeqStatus",
    "Sequence",
    "SimState",
    "UnknownProfileError",
    "create_sim_app",
    "get_profile",
    "list_profiles",
    "profile_name",
    "serve_simulator",
]
