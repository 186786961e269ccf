"""The pure core imports no I/O library (aiohttp, httpx, pynvml, sockets, sqlite)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE = [
    "scer_proxy.attribution.timeline",
    "scer_proxy.carbon.sci",
    "scer_proxy.wire.openai",
    "scer_proxy.carbon.records",
    "scer_proxy.summary.build",
    "scer_proxy.config",
    "scer_proxy.scer.rating",
    "scer_proxy.attribution.fitting",
    "scer_proxy.scer.label",
    "scer_proxy.scer.manifest",
    "scer_proxy.summary.promql",
]
FORBIDDEN = ["aiohttp", "httpx", "pynvml", "sqlite3", "socket", "asyncio", "requests"]


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io(module: str) -> None:
    code = (
        f"import sys, {module}; bad = [m for m in {FORBIDDEN!r} if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, f"{module} pulls in {out.stdout.strip()} {out.stderr[-500:]}"
