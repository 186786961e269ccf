"""RaplMeter on a fake powercap tree in tmp_path: sums packages, exact wrap-around, clear errors."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from scer_proxy.meters import MeterError
from scer_proxy.meters.rapl import RaplMeter, rapl_available


def zone(root: Path, name: str, label: str, energy_uj: int, max_uj: int = 262_143_328_850) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "name").write_text(label + "\n")
    (path / "max_energy_range_uj").write_text(f"{max_uj}\n")
    (path / "energy_uj").write_text(f"{energy_uj}\n")
    return path


def set_uj(path: Path, energy_uj: int) -> None:
    with open(path / "energy_uj", "r+") as f:  # rewrite in place, like sysfs: the open descriptor sees it
        f.truncate(0)
        f.write(f"{energy_uj}\n")


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "powercap"
    zones = {
        "pkg0": zone(root, "intel-rapl:0", "package-0", 1_000_000),
        "core0": zone(root, "intel-rapl:0:0", "core", 500_000),
        "dram0": zone(root, "intel-rapl:0:1", "dram", 7_000_000),
        "pkg1": zone(root, "intel-rapl:1", "package-1", 2_000_000, max_uj=10_000_000),
        "mmio": zone(root, "intel-rapl-mmio:0", "package-0", 1_000_000),
    }
    zones["root"] = root
    return zones


async def test_sums_packages_only_by_default(tree: dict[str, Path]) -> None:
    t = [10.0]
    meter = RaplMeter(tree["root"], clock=lambda: t[0])
    first = await meter.read()
    assert first.energy_j == 0.0 and first.t_s == 10.0
    set_uj(tree["pkg0"], 4_000_000)  # +3 J
    set_uj(tree["pkg1"], 2_500_000)  # +0.5 J
    set_uj(tree["core0"], 9_000_000)  # inside the package: not added
    set_uj(tree["dram0"], 9_000_000)  # dram is off by default
    t[0] = 10.1
    reading = await meter.read()
    assert reading.energy_j == pytest.approx(3.5, abs=1e-12)
    assert reading.devices_j == {"intel-rapl:0": 3.0, "intel-rapl:1": 0.5}
    info = meter.describe()
    assert info["kind"] == "rapl" and info["devices"] == [
        "intel-rapl:0: package-0",
        "intel-rapl:1: package-1",
    ]
    assert info["wraps"] == 0
    await meter.close()


async def test_dram_is_added_when_asked(tree: dict[str, Path]) -> None:
    meter = RaplMeter(tree["root"], dram=True)
    await meter.read()
    set_uj(tree["dram0"], 8_000_000)
    reading = await meter.read()
    assert reading.devices_j["intel-rapl:0:1"] == 1.0 and reading.energy_j == 1.0
    await meter.close()


async def test_wrap_around_is_exact(tree: dict[str, Path]) -> None:
    meter = RaplMeter(tree["root"])
    await meter.read()
    set_uj(tree["pkg1"], 9_900_000)  # +7.9 J
    assert (await meter.read()).devices_j["intel-rapl:1"] == pytest.approx(7.9, abs=1e-12)
    set_uj(tree["pkg1"], 150_000)  # wraps at 10 J: +0.1 J to the top, +0.15 J after
    reading = await meter.read()
    assert reading.devices_j["intel-rapl:1"] == pytest.approx(8.15, abs=1e-12)
    assert reading.energy_j == pytest.approx(8.15, abs=1e-12)
    assert meter.describe()["wraps"] == 1
    await meter.close()


async def test_permission_denied_is_a_clear_meter_error(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tree["pkg0"] / "energy_uj"
    os.chmod(target, 0o000)
    if os.geteuid() == 0:  # root reads anything: deny it the way the kernel does for others
        real_open = os.open
        real_read_text = Path.read_text

        def deny_open(path: os.PathLike[str] | str, flags: int, *args: int) -> int:
            if Path(path) == target:
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, flags, *args)

        def deny_read_text(self: Path, *args: Any, **kwargs: Any) -> str:
            if self == target:
                raise PermissionError(13, "Permission denied", str(self))
            return real_read_text(self, *args, **kwargs)

        monkeypatch.setattr(os, "open", deny_open)
        monkeypatch.setattr(Path, "read_text", deny_read_text)
    meter = RaplMeter(tree["root"])
    with pytest.raises(MeterError, match=r"permission denied; energy_uj is readable by root only"):
        await meter.read()
    assert rapl_available(tree["root"]) is False
    await meter.close()


async def test_no_domains_is_unavailable(tmp_path: Path) -> None:
    assert rapl_available(tmp_path / "missing") is False
    (tmp_path / "empty").mkdir()
    assert rapl_available(tmp_path / "empty") is False
    with pytest.raises(MeterError, match="no RAPL package domain"):
        await RaplMeter(tmp_path / "empty").read()


def test_available_on_a_readable_tree(tree: dict[str, Path]) -> None:
    assert rapl_available(tree["root"]) is True


async def test_garbage_is_a_meter_error(tree: dict[str, Path]) -> None:
    meter = RaplMeter(tree["root"])
    await meter.read()
    set_uj(tree["pkg0"], 0)
    (tree["pkg0"] / "energy_uj").write_text("oops\n")
    with pytest.raises(MeterError, match="does not hold an integer"):
        await meter.read()
    await meter.close()
