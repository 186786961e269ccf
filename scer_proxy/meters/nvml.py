"""NVML meter: the GPUs' own energy counters, read in-process through ``pynvml`` (nvidia-ml-py).

NVML reports millijoules and milliwatts; this meter reports joules and seconds. Methods, per device:

* ``energy_counter``: the driver's cumulative counter (integer mJ, Volta and newer). It moves only
  every *update period* (20 to 100 ms), which the meter measures at open by polling the first device
  (the median gap between its changes, :mod:`.period`); :meth:`NvmlMeter.recommended_interval_s`
  advises sampling no faster.
* ``power_integration``: where the counter is not supported, instant power (the
  ``POWER_INSTANT`` field, else ``nvmlDeviceGetPowerUsage``) integrated by the trapezoid rule between
  reads; it misses power changes faster than the sampling interval.

Each device's read is stamped at the middle of its own call, and a reading stands at the mean of its
devices' stamps: one stamp taken before the loop was late by the whole loop for the last device (3 to
5 ms a call on an H100: about 30 ms on 8 GPUs). The devices' values are not interpolated to that
instant: a counter that steps every 20 to 100 ms would be given values it never held, and the sum would
change at reads where no counter stepped.

MIG: NVML gives board energy only; the meter warns once and reports ``"mig": true``. A MIG device
(addressed by its ``MIG-...`` UUID) is read as its board, and two addresses of one board (an index and
a UUID, two MIG devices) are read once. :meth:`NvmlMeter.hardware_keys` names the boards, so that
upstreams on one board share one meter (``scer_proxy/app.py``).

Counter faults:

* **Backwards step** (driver reload, GPU reset): a per-device offset keeps the total monotonic,
  losing only the energy between the previous read and the restart; ``describe()["resets"]`` counts
  them.
* **Stall**: a counter unchanged for over ``stall_after_s`` (default ``max(1 s, 10 x update period)``)
  while the GPU draws at least ``STALL_MIN_POWER_W`` (or cannot say) makes ``read()`` raise
  :class:`MeterError` and ``describe()["stalled"]`` true, so a frozen value is never a silent zero.

Errors: every NVML failure becomes an :class:`NvmlError` (a :class:`MeterError` with NVML's ``code``)
in one place, :meth:`NvmlMeter._call`. After ``Uninitialized``, ``GpuIsLost`` or ``DriverNotLoaded``
the next read re-initialises NVML, keeping the offsets.

Event loop: NVML calls are synchronous and usually take microseconds, but the energy call can take
milliseconds on some systems, and a thread hop costs more than a quick call. So reads run on the loop
and are timed; the first slower than ``INLINE_MAX_S`` moves every later read to the meter's own
single thread (calls stay in order). Opening and closing always run in that thread.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import structlog

from scer_proxy.meters import MeterError, Reading
from scer_proxy.meters.period import ChangeGaps

log = structlog.get_logger("scer_proxy.meter.nvml")

# NVML's numeric codes, used when the given module lacks the name (they are part of NVML's ABI).
_NVML_SUCCESS = 0
_ERROR_UNINITIALIZED = 1
_ERROR_NOT_SUPPORTED = 3
_ERROR_DRIVER_NOT_LOADED = 9
_ERROR_LIBRARY_NOT_FOUND = 12
_ERROR_FUNCTION_NOT_FOUND = 13
_ERROR_GPU_IS_LOST = 15
_FI_DEV_POWER_INSTANT = 186
_DEVICE_MIG_ENABLE = 1
# nvmlValueType_t -> the member of c_nvmlValue_t that holds it
_VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}

ENERGY_COUNTER = "energy_counter"
POWER_INTEGRATION = "power_integration"
STALL_MIN_POWER_W = 1.0
INLINE_MAX_S = 0.0005  # a read that takes longer moves all later reads off the event loop
PROBE_GAPS = 3  # gaps between changes the probe at open waits for (within probe_timeout_s)

Sleep = Callable[[float], Awaitable[None]]


class NvmlError(MeterError):
    """A failed NVML call; ``code`` is NVML's return code (None when the library is missing)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


def _load_pynvml() -> ModuleType:
    try:
        return importlib.import_module("pynvml")
    except ImportError as exc:  # nvidia-ml-py is a dependency, but keep the failure readable
        raise NvmlError(f"cannot import pynvml (install nvidia-ml-py): {exc}") from exc


def nvml_available(nvml: Any = None) -> bool:
    """Does NVML initialise and see at least one GPU? Never raises (for ``meter.kind = "auto"``)."""
    try:
        module = nvml if nvml is not None else _load_pynvml()
        module.nvmlInit()
    except Exception:
        return False
    try:
        return int(module.nvmlDeviceGetCount()) > 0
    except Exception:
        return False
    finally:
        try:
            module.nvmlShutdown()
        except Exception:
            pass


@dataclass(slots=True)
class _Device:
    address: int | str  # as configured: index or UUID
    key: str = ""  # the key in Reading.devices_j: the NVML index, as a string
    label: str = ""  # "0: NVIDIA H100 80GB HBM3 (GPU-...)"
    handle: Any = None
    method: str = ENERGY_COUNTER
    power_source: str | None = None  # power_integration: "instant_field" | "power_usage"
    mig: bool = False
    # energy_counter state, integer mJ
    last_raw_mj: int | None = None
    offset_mj: int = 0
    last_change_s: float | None = None
    stalled: bool = False
    # power_integration state
    energy_mj: float = 0.0
    last_t_s: float | None = None
    last_power_mw: float | None = None

    @property
    def energy_j(self) -> float:
        if self.method == ENERGY_COUNTER:
            return (0 if self.last_raw_mj is None else self.last_raw_mj + self.offset_mj) / 1000.0
        return self.energy_mj / 1000.0


class NvmlMeter:
    """Cumulative energy of an upstream's GPUs through NVML, summed over the devices (joules)."""

    source = "nvml"

    def __init__(
        self,
        gpus: Iterable[int | str] = (0,),
        *,
        clock: Callable[[], float] = time.monotonic,
        nvml: Any = None,
        sleep: Sleep = asyncio.sleep,
        probe_step_s: float = 0.002,
        probe_timeout_s: float = 0.3,
        stall_after_s: float | None = None,
        inline_max_s: float = INLINE_MAX_S,
    ) -> None:
        """``gpus``: NVML indices or UUIDs; ``nvml``: the module to call (default ``pynvml``, imported
        on open); ``sleep``: awaited between probe polls (tests pass one that advances a fake clock)."""
        addresses = tuple(gpus)
        self.gpus = addresses
        if not addresses:
            raise ValueError("NvmlMeter needs at least one GPU index or UUID")
        self._devices = [_Device(address=a) for a in addresses]
        self._boards: dict[str, str] = {}  # device key (the board's NVML index) -> the board's UUID
        self._clock = clock
        self._nvml: Any = nvml
        self._sleep = sleep
        self._probe_step_s = probe_step_s
        self._probe_timeout_s = probe_timeout_s
        self._stall_after_s = stall_after_s
        self._inline_max_s = inline_max_s
        self._initialised = False  # nvmlInit succeeded and is not yet matched by nvmlShutdown
        self._opened = False  # devices resolved and methods chosen (survives a re-initialisation)
        self._handles_valid = False
        self._closed = False
        self._mig_warned = False
        self.update_period_s: float | None = None
        self.resets = 0
        self._thread: ThreadPoolExecutor | None = None  # where slow NVML calls run
        self.reads_in_thread = False

    # -- public ---------------------------------------------------------------------------------
    async def open(self) -> None:
        """Initialise NVML, resolve the devices, choose each one's method, measure the update period.

        Called by the first :meth:`read` when not called before; calling it again does nothing.
        """
        if self._closed:
            raise NvmlError("the NVML meter is closed")
        if self._opened and self._handles_valid:
            return
        if not await self._in_thread(self._open_devices):
            return  # a re-initialisation after a lost GPU or driver: methods, offsets and period are kept
        try:
            self.update_period_s = await self._probe_period(self._devices[0])
        except NvmlError as exc:  # the reads will report a lasting fault; the period stays unknown
            log.warning("nvml_probe_failed", error=str(exc))

    def _open_devices(self) -> bool:
        """Initialise NVML and resolve the handles; the first time, inspect the devices (returns True)."""
        self._init()
        try:
            for device in self._devices:
                device.handle = self._resolve(device.address)
            self._handles_valid = True
            if self._opened:
                return False
            for device in self._devices:
                self._inspect(device)
            unique: dict[str, _Device] = {}
            for device in self._devices:
                unique.setdefault(device.key, device)  # one board addressed twice is read once
            self._devices = list(unique.values())
            self._opened = True
            return True
        except MeterError:
            self._shutdown()
            raise

    def widened(self, gpus: Iterable[int | str]) -> NvmlMeter:
        """A new, unopened meter like this one over ``gpus`` (for upstreams whose GPU sets overlap)."""
        return NvmlMeter(
            gpus,
            clock=self._clock,
            nvml=self._nvml,
            sleep=self._sleep,
            probe_step_s=self._probe_step_s,
            probe_timeout_s=self._probe_timeout_s,
            stall_after_s=self._stall_after_s,
            inline_max_s=self._inline_max_s,
        )

    def recommended_interval_s(self, configured_s: float) -> float:
        """The sampling interval to use: the configured one, but never below the update period."""
        return max(configured_s, self.update_period_s or 0.0)

    async def read(self) -> Reading:
        """One reading: cumulative joules per device (keyed by NVML index) and their sum."""
        if not (self._opened and self._handles_valid):
            await self.open()
        try:
            if self.reads_in_thread:
                t_s = await self._in_thread(self._read_devices)
            else:
                t_s = self._timed(self._read_devices)
        except NvmlError as exc:
            if exc.code in (_ERROR_UNINITIALIZED, _ERROR_GPU_IS_LOST, _ERROR_DRIVER_NOT_LOADED):
                self._handles_valid = False
                self._shutdown()
            raise
        devices_j = {device.key: device.energy_j for device in self._devices}
        return Reading(t_s=t_s, energy_j=sum(devices_j.values()), devices_j=devices_j)

    def _read_devices(self) -> float:
        """Read every device, each stamped at the middle of its own call; the reading's time is their mean."""
        stamps: list[float] = []
        for device in self._devices:
            started_s = self._clock()
            if device.method == ENERGY_COUNTER:
                raw = self._counter_mj(device)
                t_s = 0.5 * (started_s + self._clock())
                self._apply_counter(device, raw, t_s)
            else:
                power_mw = self._power_mw(device)
                t_s = 0.5 * (started_s + self._clock())
                self._apply_power(device, power_mw, t_s)
            stamps.append(t_s)
        return sum(stamps) / len(stamps)

    def hardware_keys(self) -> frozenset[str]:
        """The boards this meter reads, in keys two meters of one board share: ``gpu:<board UUID>`` once
        open (an index, a UUID and the MIG devices of one board meet there), and the addresses."""
        keys = {f"nvml:{device.address}" for device in self._devices}
        for key, board_uuid in self._boards.items():
            keys.update({f"gpu:{board_uuid}", f"nvml:{key}", f"nvml:{board_uuid}"})
        return frozenset(keys)

    def _timed(self, function: Callable[..., Any], *args: Any) -> Any:
        """Call ``function`` on the event loop; if it took longer than ``inline_max_s`` (default
        ``INLINE_MAX_S``), move later reads to the meter's thread."""
        started = time.perf_counter()
        try:
            return function(*args)
        finally:
            took_s = time.perf_counter() - started
            if took_s > self._inline_max_s and not self.reads_in_thread:
                self.reads_in_thread = True
                log.info(
                    "nvml_reads_moved_to_thread",
                    took_ms=round(took_s * 1000.0, 3),
                    limit_ms=self._inline_max_s * 1000.0,
                )

    async def _in_thread(self, function: Callable[..., Any], *args: Any) -> Any:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvml")
        return await asyncio.get_running_loop().run_in_executor(self._thread, function, *args)

    def describe(self) -> dict[str, Any]:
        methods = {device.method for device in self._devices}
        return {
            "kind": self.source,
            "devices": [device.label or str(device.address) for device in self._devices],
            "update_period_ms": None if self.update_period_s is None else self.update_period_s * 1000.0,
            "method": methods.pop() if len(methods) == 1 else "mixed",
            "power_source": next((d.power_source for d in self._devices if d.power_source), None),
            "mig": any(device.mig for device in self._devices),
            "resets": self.resets,
            "stalled": any(device.stalled for device in self._devices),
            "reads_in_thread": self.reads_in_thread,
        }

    async def close(self) -> None:
        """Shut NVML down (once); later reads raise :class:`MeterError`."""
        self._closed = True
        self._handles_valid = False
        if self._thread is None:
            self._shutdown()
            return
        try:
            await self._in_thread(self._shutdown)  # after a read still running in the thread
        finally:
            self._thread.shutdown(wait=False)
            self._thread = None

    # -- the one place where NVML errors are translated -----------------------------------------
    def _module(self) -> Any:
        if self._nvml is None:
            self._nvml = _load_pynvml()
        return self._nvml

    def _call(self, function: str, *args: Any, device: _Device | None = None) -> Any:
        """Call ``nvml.<function>(*args)``; every failure becomes an :class:`NvmlError` naming the device.

        NVMLError keeps its NVML code; a function missing from an old pynvml reads as
        ``FUNCTION_NOT_FOUND``; anything else (a ctypes fault) has no code. Nothing else escapes, so the
        sampler, which handles :class:`MeterError`, never dies of an NVML failure.
        """
        nvml = self._module()
        where = "" if device is None else f" for GPU {device.label or device.address}"
        fn = getattr(nvml, function, None)
        if fn is None:
            raise NvmlError(f"NVML {function}{where} failed: not in this pynvml", _ERROR_FUNCTION_NOT_FOUND)
        try:
            return fn(*args)
        except Exception as exc:
            error_type = getattr(nvml, "NVMLError", None)
            if error_type is not None and isinstance(exc, error_type):
                code = getattr(exc, "value", None)
                hint = ""
                if code in (_ERROR_LIBRARY_NOT_FOUND, _ERROR_DRIVER_NOT_LOADED):
                    hint = " (no NVIDIA driver on this machine?)"
                raise NvmlError(f"NVML {function}{where} failed: {exc}{hint}", code) from exc
            raise NvmlError(f"NVML {function}{where} failed: {exc.__class__.__name__}: {exc}") from exc

    # -- opening --------------------------------------------------------------------------------
    def _init(self) -> None:
        if not self._initialised:
            self._call("nvmlInit")
            self._initialised = True

    def _shutdown(self) -> None:
        if self._initialised:
            self._initialised = False
            try:
                self._call("nvmlShutdown")
            except MeterError as exc:
                log.debug("nvml_shutdown_failed", error=str(exc))

    def _resolve(self, address: int | str) -> Any:
        """The handle of the board at ``address``: a MIG device's is its parent's (board energy only)."""
        probe = _Device(address=address)
        if isinstance(address, int) or str(address).isdigit():
            return self._call("nvmlDeviceGetHandleByIndex", int(address), device=probe)
        handle = self._call("nvmlDeviceGetHandleByUUID", str(address), device=probe)
        try:
            is_mig = bool(self._call("nvmlDeviceIsMigDeviceHandle", handle, device=probe))
        except NvmlError:
            is_mig = False  # an old driver or pynvml: no MIG devices
        if is_mig:
            handle = self._call("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", handle, device=probe)
        return handle

    def _inspect(self, device: _Device) -> None:
        handle = device.handle
        name = _text(self._call("nvmlDeviceGetName", handle, device=device))
        uuid = _text(self._call("nvmlDeviceGetUUID", handle, device=device))
        try:
            index = str(self._call("nvmlDeviceGetIndex", handle, device=device))
        except NvmlError:
            index = str(device.address)
        device.key = index
        device.label = f"{index}: {name} ({uuid})"
        self._boards[index] = uuid
        try:
            current, _pending = self._call("nvmlDeviceGetMigMode", handle, device=device)
            device.mig = int(current) == int(
                getattr(self._module(), "NVML_DEVICE_MIG_ENABLE", _DEVICE_MIG_ENABLE)
            )
        except NvmlError:
            device.mig = False  # MIG not supported on this GPU
        if device.mig and not self._mig_warned:
            self._mig_warned = True
            log.warning(
                "nvml_mig_board_energy_only",
                device=device.label,
                note="MIG is enabled: NVML reports the whole board's energy, not a MIG instance's",
            )
        try:
            self._call("nvmlDeviceGetTotalEnergyConsumption", handle, device=device)
            device.method = ENERGY_COUNTER
        except NvmlError as exc:
            if exc.code not in (_ERROR_NOT_SUPPORTED, _ERROR_FUNCTION_NOT_FOUND):
                raise
            device.method = POWER_INTEGRATION
            try:
                self._instant_power_mw(device)
                device.power_source = "instant_field"
            except NvmlError:
                self._call("nvmlDeviceGetPowerUsage", handle, device=device)
                device.power_source = "power_usage"
            log.info(
                "nvml_power_integration",
                device=device.label,
                power_source=device.power_source,
                reason=str(exc),
            )

    async def _probe_period(self, device: _Device) -> float | None:
        """The median gap between changes of the device's counter (or power), polled for a bounded time
        (:class:`~scer_proxy.meters.period.ChangeGaps`; the sampler goes on measuring it)."""
        sample = self._counter_mj if device.method == ENERGY_COUNTER else self._power_mw
        gaps = ChangeGaps()
        start_s = self._clock()
        while self._clock() - start_s < self._probe_timeout_s and gaps.gaps < PROBE_GAPS:
            started_s = self._clock()
            value = (
                await self._in_thread(sample, device) if self.reads_in_thread else self._timed(sample, device)
            )
            gaps.observe(0.5 * (started_s + self._clock()), {"probe": float(value)})
            await self._sleep(self._probe_step_s)
        return gaps.period_s

    # -- reading --------------------------------------------------------------------------------
    def _counter_mj(self, device: _Device) -> int:
        return int(self._call("nvmlDeviceGetTotalEnergyConsumption", device.handle, device=device))

    def _instant_power_mw(self, device: _Device) -> float:
        nvml = self._module()
        field_id = int(getattr(nvml, "NVML_FI_DEV_POWER_INSTANT", _FI_DEV_POWER_INSTANT))
        (value,) = self._call("nvmlDeviceGetFieldValues", device.handle, [field_id], device=device)
        code = int(getattr(value, "nvmlReturn", _NVML_SUCCESS))
        if code != _NVML_SUCCESS:
            raise NvmlError(
                f"NVML field POWER_INSTANT for GPU {device.label or device.address} failed with code {code}",
                code,
            )
        member = _VALUE_MEMBERS.get(int(getattr(value, "valueType", 1)), "uiVal")
        return float(getattr(value.value, member))

    def _power_mw(self, device: _Device) -> float:
        if device.power_source == "instant_field":
            return self._instant_power_mw(device)
        return float(self._call("nvmlDeviceGetPowerUsage", device.handle, device=device))

    def _apply_counter(self, device: _Device, raw: int, t_s: float) -> None:
        last = device.last_raw_mj
        if last is None or raw > last:
            device.last_change_s = t_s
            device.stalled = False
        elif raw < last:
            device.offset_mj += last
            self.resets += 1
            device.last_change_s = t_s
            device.stalled = False
            log.warning(
                "nvml_counter_reset", device=device.label, previous_mj=last, now_mj=raw, resets=self.resets
            )
        else:
            self._check_stall(device, t_s)
        device.last_raw_mj = raw

    def _check_stall(self, device: _Device, t_s: float) -> None:
        assert device.last_change_s is not None
        frozen_s = t_s - device.last_change_s
        limit_s = self._stall_after_s
        if limit_s is None:
            limit_s = max(1.0, 10.0 * (self.update_period_s or 0.1))
        if frozen_s <= limit_s:
            return
        try:
            power_w: float | None = (
                float(self._call("nvmlDeviceGetPowerUsage", device.handle, device=device)) / 1000.0
            )
        except NvmlError:
            power_w = None
        if power_w is not None and power_w < STALL_MIN_POWER_W:
            return
        if not device.stalled:
            log.warning(
                "nvml_counter_stalled", device=device.label, frozen_s=round(frozen_s, 3), power_w=power_w
            )
        device.stalled = True
        # a stable message: the sampler logs a changed message again, so details go in the warning above
        raise NvmlError(
            f"NVML energy counter of GPU {device.label} is stalled: unchanged for over "
            f"{limit_s:.1f} s while the GPU draws power"
        )

    def _apply_power(self, device: _Device, power_mw: float, t_s: float) -> None:
        if device.last_t_s is not None and device.last_power_mw is not None and t_s > device.last_t_s:
            device.energy_mj += (device.last_power_mw + power_mw) / 2.0 * (t_s - device.last_t_s)
        device.last_t_s = t_s
        device.last_power_mw = power_mw


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
