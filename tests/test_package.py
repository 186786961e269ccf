"""The package as the Dockerfile builds it: from ``pyproject.toml``, ``README.md`` and ``scer_proxy/``
alone, into a wheel that carries every data file and runs from outside the source tree.

The wheel is built without build isolation (setuptools comes with the dev extras), so no network is
needed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.servers import ROOT


def test_the_wheel_carries_every_file_and_runs_outside_the_source_tree(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):  # what the Dockerfile's build stage copies
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "scer_proxy", src / "scer_proxy", ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("scer_proxy-*.whl")

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(
            archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")
        )
    shipped = {p.relative_to(src).as_posix() for p in (src / "scer_proxy").rglob("*") if p.is_file()}
    assert {
        "scer_proxy/data/cl100k_base.tiktoken",
        "scer_proxy/data/mlenergy-v3-llm.csv",
        "scer_proxy/web/dashboard.html",
        "scer_proxy/workloads/standard-chat-v1.json",
    } <= shipped
    assert shipped - names == set(), "files of the package the wheel leaves out"
    assert "scer-proxy = scer_proxy.cli.main:main" in entry_points

    # Installed on its own and run from an empty directory: the bundled tokenizer, profiles, grid table
    # and workload load from the installed files (the demo runs the simulator, the proxy and a workload).
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCER_")}
    env["PYTHONPATH"] = str(site)
    demo = subprocess.run(
        [sys.executable, "-m", "scer_proxy", "demo", "--once"],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "\ntotal " in demo.stdout and "energy source: simulated" in demo.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import scer_proxy; print(scer_proxy.__file__)"],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert Path(probe.stdout.strip()).is_relative_to(site)
