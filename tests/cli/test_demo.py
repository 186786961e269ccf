"""``scer-proxy demo --once``: simulator and proxy in one process, a workload, the summary table."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_once_prints_the_summary_table() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "scer_proxy",
            "demo",
            "--once",
            "--requests",
            "16",
            "--concurrency",
            "4",
            "--time-scale",
            "40",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    for column in (
        "requests",
        "prompt tokens",
        "completion tokens",
        "Wh",
        "gCO2e",
        "gCO2e per 1,000 output tokens",
        "grade",
    ):
        assert column in header
    row = next(line for line in lines if line.startswith("meta-llama/Llama-3.1-8B-Instruct"))
    assert re.search(r"\s16\s", row)  # all 16 requests accounted
    total = next(line for line in lines if line.startswith("total "))
    numbers = re.findall(r"[\d,.]+", total)
    assert float(numbers[3]) > 0  # Wh measured from the simulator's counter
    assert "energy source: simulated" in out.stdout
    assert "/scer/summary" in out.stdout
    assert re.search(r"^dashboard\s+http://\S+/scer/$", out.stdout, re.MULTILINE)  # the page, left on screen
