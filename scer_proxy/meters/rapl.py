"""RAPL meter: CPU package energy from Linux powercap, for models served on CPUs (llama.cpp).

Reads ``<root>/intel-rapl:<n>/energy_uj`` (microjoules; the ``intel_rapl`` driver serves AMD Zen
packages under the same name) and reports cumulative joules since the meter's first read.

Domains counted, to avoid double counting:

* by default the top-level **package** domains only (``name`` = ``package-<n>``): cores, uncore and
  the integrated GPU are inside the package figure, so their sub-domains are never added;
* ``dram=True`` adds the ``dram`` sub-domains (``intel-rapl:<n>:<m>`` named ``dram``): DRAM energy is
  *outside* the package figure on servers, so adding it does not double count, but it is not
  present (or not accurate) on every machine, hence off by default;
* ``psys`` (platform, laptops) contains the package and is never added; ``intel-rapl-mmio:*``
  duplicates the package through another interface and is ignored.

Wrap-around: each counter runs from 0 to ``max_energy_range_uj`` and then wraps to 0. When a value
is below the previous one, the step is ``value + max_energy_range_uj - previous`` (exact up to one
energy unit, about 15 to 61 microjoules). A counter that wraps twice between reads cannot be told
from one that wrapped once; at the usual 262 kJ range that needs over 20 minutes between reads even
at 200 W, against a sampling interval of about 100 ms. ``describe()["wraps"]`` counts them.

Permissions: since Linux 5.10 (CVE-2020-8694, "PLATYPUS") ``energy_uj`` is readable by root only;
an unreadable file is a :class:`MeterError` saying so. Reads are ``pread`` calls on descriptors kept
open (a few microseconds each), made directly on the event loop.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scer_proxy.meters import MeterError, Reading

DEFAULT_ROOT = "/sys/class/powercap"
_PERMISSION_HINT = (
    "energy_uj is readable by root only since Linux 5.10 (CVE-2020-8694): run the proxy as root, grant "
    'read access (e.g. a udev rule or `chmod a+r .../energy_uj`), or use meter.kind = "estimate"'
)


@dataclass(slots=True)
class RaplDomain:
    """One powercap zone: ``path`` its directory, ``name`` its ``name`` file (``package-0``, ``dram``)."""

    path: Path
    name: str
    max_range_uj: int
    fd: int | None = None
    last_uj: int | None = None
    total_uj: int = 0  # counted since the first read, wrap-arounds resolved

    @property
    def key(self) -> str:
        return self.path.name


def _read_text(path: Path) -> str:
    return path.read_text(encoding="ascii").strip()


def find_domains(root: str | os.PathLike[str] = DEFAULT_ROOT, *, dram: bool = False) -> list[RaplDomain]:
    """The package domains under ``root`` (and their ``dram`` sub-domains with ``dram=True``).

    Raises :class:`MeterError` when a domain's ``name`` or ``max_energy_range_uj`` cannot be read.
    """
    base = Path(root)
    found: list[RaplDomain] = []
    try:
        zones = sorted(p for p in base.glob("intel-rapl:*") if p.is_dir())
    except OSError as exc:
        raise MeterError(f"cannot list RAPL domains under {base}: {exc}") from exc
    for zone in zones:
        parts = zone.name.split(":")
        try:
            name = _read_text(zone / "name")
            max_range = int(_read_text(zone / "max_energy_range_uj"))
        except (OSError, ValueError) as exc:
            raise MeterError(f"cannot read RAPL domain {zone}: {exc}") from exc
        top_level = len(parts) == 2
        if (top_level and name.startswith("package")) or (dram and len(parts) == 3 and name == "dram"):
            found.append(RaplDomain(path=zone, name=name, max_range_uj=max_range))
    return found


def rapl_available(root: str | os.PathLike[str] = DEFAULT_ROOT) -> bool:
    """Are there package domains under ``root`` whose ``energy_uj`` this process can read? Never raises."""
    try:
        domains = find_domains(root)
        for domain in domains:
            int(_read_text(domain.path / "energy_uj"))
    except (MeterError, OSError, ValueError):
        return False
    return bool(domains)


class RaplMeter:
    """Cumulative CPU package energy (joules) summed over the RAPL domains, counted from the first read."""

    source = "rapl"

    def __init__(
        self,
        root: str | os.PathLike[str] = DEFAULT_ROOT,
        *,
        dram: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = Path(root)
        self.dram = dram
        self._clock = clock
        self._domains: list[RaplDomain] | None = None
        self.wraps = 0

    def _open(self) -> list[RaplDomain]:
        domains = find_domains(self.root, dram=self.dram)
        if not domains:
            raise MeterError(f"no RAPL package domain under {self.root} (no intel-rapl powercap zones)")
        try:
            for domain in domains:
                domain.fd = self._open_fd(domain.path / "energy_uj")
        except MeterError:
            _close_all(domains)
            raise
        return domains

    @staticmethod
    def _open_fd(path: Path) -> int:
        try:
            return os.open(path, os.O_RDONLY)
        except PermissionError as exc:
            raise MeterError(f"cannot read {path}: permission denied; {_PERMISSION_HINT}") from exc
        except OSError as exc:
            raise MeterError(f"cannot open {path}: {exc}") from exc

    @staticmethod
    def _read_uj(domain: RaplDomain) -> int:
        assert domain.fd is not None
        path = domain.path / "energy_uj"
        try:
            raw = os.pread(domain.fd, 64, 0)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise MeterError(f"cannot read {path}: permission denied; {_PERMISSION_HINT}") from exc
            raise MeterError(f"cannot read {path}: {exc}") from exc
        try:
            return int(raw.strip())
        except ValueError as exc:
            raise MeterError(f"{path} does not hold an integer: {raw[:32]!r}") from exc

    async def read(self) -> Reading:
        """Joules per domain (keyed ``intel-rapl:0``, ...) counted since the first read, and their sum."""
        if self._domains is None:
            self._domains = self._open()
        values = [self._read_uj(domain) for domain in self._domains]
        t_s = self._clock()
        for domain, value in zip(self._domains, values, strict=True):
            last = domain.last_uj
            if last is not None:
                if value >= last:
                    domain.total_uj += value - last
                else:
                    domain.total_uj += value + domain.max_range_uj - last
                    self.wraps += 1
            domain.last_uj = value
        devices_j = {domain.key: domain.total_uj / 1e6 for domain in self._domains}
        return Reading(t_s=t_s, energy_j=sum(d.total_uj for d in self._domains) / 1e6, devices_j=devices_j)

    def hardware_keys(self) -> frozenset[str]:
        """The CPU packages of this host: every RAPL meter of one root reads the same counters."""
        return frozenset({f"rapl:{self.root.resolve()}"})

    def describe(self) -> dict[str, Any]:
        domains = self._domains if self._domains is not None else []
        return {
            "kind": self.source,
            "devices": [f"{d.key}: {d.name}" for d in domains],
            "root": str(self.root),
            "dram": self.dram,
            "wraps": self.wraps,
        }

    async def close(self) -> None:
        if self._domains is not None:
            _close_all(self._domains)
            self._domains = None


def _close_all(domains: list[RaplDomain]) -> None:
    for domain in domains:
        if domain.fd is not None:
            os.close(domain.fd)
            domain.fd = None
