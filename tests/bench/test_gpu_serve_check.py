"""``bench/gpu_serve_check.py --cpu``: the GPU serving check's dry run, end to end over HTTP.

Three real processes: the engine-shaped upstream (numpy, with a modelled counter at ``/metrics``), the
proxy metering it, and the check driving both with the openai client. The reference is the counter's
model, exact at any instant, over each request's span at the proxy, so the proxy's figures must match
it; the non-streamed requests' response-time figures once missed it by the error of the token-rate prior
(5 to 11 times over, here). (The reference was once the counter polled every 5 ms over the client's
span, and this test failed in CI at 6 % off it: under load here that reference read up to 4 % low on
the shortest requests, and with the DCGM meter's old stamp, after the scrape's answer, one settled
figure in 138 was 6.5 % off the exact model.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_matches_the_counter(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_serve_check.py"),
            "--cpu",
            "--requests",
            "8",
            "--gap-s",
            "0.3",
            "--json",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        # Only a guard against a hang: the dry run's upstream does its decode steps in numpy, so its wall
        # time is the CPU this machine lends it (about 60 s idle, 255 s beside two CPU hogs and other test
        # runs, when 180 s timed out). Nothing asserted below depends on it: the reference is the counter's
        # model over each request's own span at the proxy, exact however slow the steps.
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
    assert figures["sources"] == ["simulated"] and figures["all_settled"]
    assert figures["conservation_rel"] <= 1e-9
    assert figures["reference"] == "the upstream's counter model"
    rows = figures["isolated"]
    assert len(rows) == 6 and {row["stream"] for row in rows} == {True, False}
    for row in rows:
        assert row["reference_j"] > 0
        # The proxy's span (its record's wall times, taken to the client's clock) lies inside the client's.
        assert 0 < row["duration_s"] <= row["client_duration_s"] + 0.005, row
        # The polled counter still runs (the GPU run's reference): in joules, near the model.
        assert abs(row["polled_reference_j"] / row["reference_j"] - 1) <= 0.25, row
        assert abs(row["settled_vs_reference"]) <= 0.05, row
        assert row["header_j"] is not None and row["header_j"] > 0, row
        if not row["stream"]:
            # The fault this guards against was a factor of 5 to 11; the rest is the timing of a few
            # short intervals on a loaded machine (a 0.17 s stream's figure was once 23 % off under CI).
            assert abs(row["header_vs_reference"]) <= 0.25, row
    assert figures["concurrent_attributed_j"] > 0 and figures["concurrent_requests"] == 8
