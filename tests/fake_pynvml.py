"""A fake ``pynvml`` whose GPUs follow a simulator :class:`~scer_proxy.sim.engine.Engine`.

It exposes the subset of the pynvml API that :class:`scer_proxy.meters.nvml.NvmlMeter` uses, with the
real ``pynvml`` error classes and constants (so ``except pynvml.NVMLError_NotSupported`` means the same
thing). Its energy counter behaves like NVML's: integer millijoules, moving only at the engine's
published readings (every ``engine.metrics_period_s`` of simulated time, with the exact counter at
that instant), split evenly over the GPUs like the simulator's ``/metrics``. Power:
``nvmlDeviceGetPowerUsage`` is the published mean power of the last period (mW, like NVML's averaged
reading), ``NVML_FI_DEV_POWER_INSTANT`` the engine's power at this instant (mW).

Knobs: ``pre_volta`` (the energy counter raises ``NVMLError_NotSupported``; ``instant_field=False``
also removes the instant-power field), ``mig`` (with ``mig_devices`` MIG devices a GPU, addressed by
the UUIDs in ``mig_uuids``: their handles answer ``nvmlDeviceIsMigDeviceHandle`` and lead to their
board), ``call_s`` (each energy-counter call takes that long: ``advance(call_s / 2)`` on each side of
the value, e.g. a fake clock's), :meth:`reload_driver` (counters restart from 0),
:meth:`stall` / :meth:`unstall` (counters frozen), :meth:`fail_next` (the next n calls raise),
``driver_loaded=False`` (``nvmlInit`` raises ``NVMLError_DriverNotLoaded``).
"""

from __future__ import annotations

import collections
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pynvml

from scer_proxy.sim.engine import Engine

NVMLError = pynvml.NVMLError


@dataclass(frozen=True)
class FakeHandle:
    index: int


@dataclass(frozen=True)
class FakeMigHandle:
    parent: int
    instance: int


class FakeNvml:
    """Use as the ``nvml`` module of ``NvmlMeter``: ``NvmlMeter(gpus, nvml=FakeNvml(engine))``."""

    def __init__(
        self,
        engine: Engine,
        *,
        num_gpus: int | None = None,
        name: str | None = None,
        pre_volta: bool = False,
        instant_field: bool = True,
        mig: bool = False,
        driver_loaded: bool = True,
        initial_mj: int = 123_456_789,
        mig_devices: int = 0,
        call_s: float = 0.0,
        advance: Callable[[float], None] = time.sleep,
    ) -> None:
        self.engine = engine
        self.num_gpus = num_gpus if num_gpus is not None else engine.profile.num_gpus
        self.name = name if name is not None else engine.profile.gpu_product_name
        self.pre_volta = pre_volta
        self.instant_field = instant_field
        self.mig = mig
        self.driver_loaded = driver_loaded
        self.uuids = [f"GPU-{uuid.uuid5(uuid.NAMESPACE_URL, f'fake-nvml/{i}')}" for i in range(self.num_gpus)]
        self.mig_uuids = {
            f"MIG-{uuid.uuid5(uuid.NAMESPACE_URL, f'fake-nvml/{i}/{m}')}": FakeMigHandle(i, m)
            for i in range(self.num_gpus)
            for m in range(mig_devices)
        }
        self.call_s = call_s
        self.advance = advance
        self.calls: collections.Counter[str] = collections.Counter()
        self.inits = 0
        self.shutdowns = 0
        self._base_mj = [initial_mj] * self.num_gpus  # counter value at the start of the current epoch
        self._epoch_energy_j = 0.0  # engine energy when the current epoch (driver load) began
        self._epoch_sim_s = -1.0  # counters read 0 until the first reading published after this
        self._frozen: list[int] | None = None
        self._fail: list[tuple[int, str | None]] = []  # (code, function or None for any)

    # -- knobs ----------------------------------------------------------------------------------
    def reload_driver(self) -> None:
        """The driver reloads now: every counter restarts from 0 at this instant."""
        now_s = self.engine.sync()
        self._base_mj = [0] * self.num_gpus
        self._epoch_energy_j = self.engine.counter_j
        self._epoch_sim_s = now_s

    def stall(self) -> None:
        """Freeze the counters at their present values."""
        self._frozen = [self.counter_mj(i) for i in range(self.num_gpus)]

    def unstall(self) -> None:
        self._frozen = None

    def fail_next(
        self, n: int = 1, code: int = pynvml.NVML_ERROR_UNKNOWN, function: str | None = None
    ) -> None:
        """The next ``n`` API calls (of ``function`` only, when given) raise ``NVMLError(code)``."""
        self._fail.extend([(code, function)] * n)

    # -- the truth the counters follow ------------------------------------------------------------
    def counter_mj(self, index: int) -> int:
        """The published counter of GPU ``index`` (mJ), as NVML would report it now."""
        if self._frozen is not None:
            return self._frozen[index]
        self.engine.sync()
        published = self.engine.published
        if published.sim_time_s <= self._epoch_sim_s:
            return self._base_mj[index]
        epoch_j = published.energy_j - self._epoch_energy_j
        return self._base_mj[index] + int(epoch_j * 1000.0 / self.num_gpus)

    # -- the pynvml API -------------------------------------------------------------------------
    def _enter(self, function: str) -> None:
        self.calls[function] += 1
        if self._fail and self._fail[0][1] in (None, function):
            code, _ = self._fail.pop(0)
            raise NVMLError(code)

    def _device(self, handle: Any, function: str) -> int:
        self._enter(function)
        if not isinstance(handle, FakeHandle) or not 0 <= handle.index < self.num_gpus:
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return handle.index

    def nvmlInit(self) -> None:
        self._enter("nvmlInit")
        if not self.driver_loaded:
            raise NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED)
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return self.num_gpus

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < self.num_gpus:
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return FakeHandle(index)

    def nvmlDeviceGetHandleByUUID(self, gpu_uuid: str) -> FakeHandle | FakeMigHandle:
        self._enter("nvmlDeviceGetHandleByUUID")
        if gpu_uuid in self.mig_uuids:
            return self.mig_uuids[gpu_uuid]
        if gpu_uuid not in self.uuids:
            raise NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return FakeHandle(self.uuids.index(gpu_uuid))

    def nvmlDeviceIsMigDeviceHandle(self, handle: Any) -> int:
        self._enter("nvmlDeviceIsMigDeviceHandle")
        return int(isinstance(handle, FakeMigHandle))

    def nvmlDeviceGetDeviceHandleFromMigDeviceHandle(self, handle: Any) -> FakeHandle:
        self._enter("nvmlDeviceGetDeviceHandleFromMigDeviceHandle")
        if not isinstance(handle, FakeMigHandle):
            raise NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return FakeHandle(handle.parent)

    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        return self._device(handle, "nvmlDeviceGetIndex")

    def nvmlDeviceGetName(self, handle: Any) -> str:
        self._device(handle, "nvmlDeviceGetName")
        return self.name

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self.uuids[self._device(handle, "nvmlDeviceGetUUID")]

    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        self._device(handle, "nvmlDeviceGetMigMode")
        if self.pre_volta:
            raise NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        mode = pynvml.NVML_DEVICE_MIG_ENABLE if self.mig else pynvml.NVML_DEVICE_MIG_DISABLE
        return [mode, mode]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        index = self._device(handle, "nvmlDeviceGetTotalEnergyConsumption")
        if self.pre_volta:
            raise NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        if self.call_s:
            self.advance(self.call_s / 2.0)
        value = self.counter_mj(index)
        if self.call_s:
            self.advance(self.call_s / 2.0)
        return value

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        self._device(handle, "nvmlDeviceGetPowerUsage")
        self.engine.sync()
        return int(self.engine.published.power_w * 1000.0 / self.num_gpus)

    def nvmlDeviceGetFieldValues(self, handle: Any, field_ids: list[int]) -> list[SimpleNamespace]:
        self._device(handle, "nvmlDeviceGetFieldValues")
        self.engine.sync()
        out = []
        for field_id in field_ids:
            supported = field_id == pynvml.NVML_FI_DEV_POWER_INSTANT and self.instant_field
            value = SimpleNamespace(
                uiVal=int(self.engine.power_now_w * 1000.0 / self.num_gpus) if supported else 0
            )
            out.append(
                SimpleNamespace(
                    fieldId=field_id,
                    nvmlReturn=pynvml.NVML_SUCCESS if supported else pynvml.NVML_ERROR_NOT_SUPPORTED,
                    valueType=pynvml.NVML_VALUE_TYPE_UNSIGNED_INT,
                    value=value,
                )
            )
        return out

    def __getattr__(self, name: str) -> Any:
        """Constants and error classes come from the real pynvml (``NVML_*``, ``NVMLError_*``)."""
        if name.startswith("NVML"):
            return getattr(pynvml, name)
        raise AttributeError(name)
