"""``scer-proxy bench`` through the proxy against the simulator, and ``scer-proxy rate``."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from scer_proxy.cli.bench import run_bench
from scer_proxy.scer.benchmark import BenchError, load_workload
from scer_proxy.scer.book import published_csv
from scer_proxy.scer.rating import published_entries
from scer_proxy.sim import create_sim_app, get_profile
from tests.servers import ThreadedServers


def test_workload_is_fixed_and_versioned() -> None:
    workload = load_workload("standard-chat-v1")
    assert workload.id == "standard-chat-v1" and len(workload.prompts) == 300
    assert workload.max_tokens == 400 and workload.ignore_eos and workload.concurrency == 32
    assert workload.sha256 == load_workload("standard-chat-v1").sha256 and len(workload.sha256) == 64
    with pytest.raises(BenchError, match="--workload"):
        load_workload("nope")


@pytest.fixture
def sim_proxy(servers: ThreadedServers, start_proxy: Callable[..., str]) -> tuple[str, str]:
    # The simulator capped at a batch of 32, as the ML.ENERGY row it is compared with was measured
    # (vLLM with max_num_seqs = 32 and a saturated queue).
    profile = dataclasses.replace(get_profile("llama-3.1-8b-h100"), max_num_seqs=32)
    sim = servers.start(lambda: create_sim_app(profile, time_scale=10.0), handler_cancellation=True)
    return sim, start_proxy(sim, meter={"kind": "simulated", "interval_ms": 10})


def test_bench_energy_matches_the_published_figure_at_that_batch(sim_proxy: tuple[str, str]) -> None:
    _sim, proxy = sim_proxy
    model = "meta-llama/Llama-3.1-8B-Instruct"
    # 40 in flight keep the 32 batch slots full, as the leaderboard's saturated queue does.
    submission = asyncio.run(run_bench(proxy, model, concurrency=40, requests=160, repeats=3, progress=False))
    published = next(
        p
        for p in published_entries(published_csv(), concurrency=32)
        if p.name == model and p.category.gpu_model == "H100" and p.category.gpu_count == 1
    )
    measured = submission["result"]["j_per_1k_output_tokens"]
    assert abs(measured / published.j_per_1k_output_tokens - 1) <= 0.10, (measured, published)
    assert len(submission["repeats"]) == 3 and submission["workload"]["warmup_repeats_excluded"] == 1
    lengths = [p.get("max_tokens", 400) for p in load_workload("standard-chat-v1").prompts[:160]]
    assert all(r["output_tokens"] == sum(lengths) for r in submission["repeats"])
    assert submission["hardware"]["gpu_model"] == "H100" and submission["hardware"]["gpu_count"] == 1
    assert submission["category"] == {
        "task": "chat",
        "size_class": "<=20B",
        "gpu_model": "H100",
        "gpu_count": 1,
    }
    assert submission["meter"]["kind"] == "simulated" and model in submission["server"]["models"]
    assert submission["result"]["spread_rel"] < 0.05
    # Registered with the proxy, the submission gives the model its grade in headers and the summary.
    rated = httpx.post(f"{proxy}/scer/submissions", json=submission).json()
    assert rated["grade"] in ("A", "B", "C") and rated["peers"] >= 2
    resp = httpx.post(
        f"{proxy}/v1/chat/completions",
        json={"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]},
    )
    assert resp.headers["x-scer-rating"] == rated["grade"]
    summary = httpx.get(f"{proxy}/scer/summary").json()
    row = next(m for m in summary["models"] if m["model"] == model)
    assert row["grade"] == rated["grade"] and row["category"] == "chat / <=20B / 1 x H100"


def test_bad_submission_is_a_400(sim_proxy: tuple[str, str]) -> None:
    _sim, proxy = sim_proxy
    resp = httpx.post(f"{proxy}/scer/submissions", json={"model": "x"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "body"


def _submission(model: str, j_per_1k: float, size: str = "<=20B") -> dict:
    return {
        "model": model,
        "created_at": "2026-11-26T00:00:00Z",
        "category": {"task": "chat", "size_class": size, "gpu_model": "H100", "gpu_count": 1},
        "workload": {"concurrency": 32},
        "result": {"j_per_1k_output_tokens": j_per_1k},
    }


def test_rate_command_prints_percentiles(tmp_path: Path) -> None:
    files = []
    for name, value in (("ours-a", 90.0), ("ours-b", 400.0)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(_submission(name, value)))
        files.append(str(path))
    out = subprocess.run([sys.executable, "-m", "scer_proxy", "rate", *files], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = {
        name: line for line in out.stdout.splitlines() for name in ("ours-a", "ours-b") if f" {name} " in line
    }
    assert set(rows) == {"ours-a", "ours-b"}
    assert "published" in out.stdout and "percentile" in out.stdout
    # 90 J per 1,000 tokens beats every published <=20B H100 chat row at batch 32: the top, grade A.
    assert rows["ours-a"].split()[-1] == "A" and rows["ours-a"].split()[-2] == "100.0"
    quint = subprocess.run(
        [sys.executable, "-m", "scer_proxy", "rate", "--quintiles", *files], capture_output=True, text=True
    )
    assert quint.returncode == 0 and "not the SCER default" in quint.stdout


def test_rate_command_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    for argv in (["rate", str(tmp_path / "missing.json")], ["rate", str(bad)]):
        out = subprocess.run([sys.executable, "-m", "scer_proxy", *argv], capture_output=True, text=True)
        assert (
            out.returncode == 2
            and len(out.stderr.strip().splitlines()) == 1
            and "Traceback" not in out.stderr
        )


def test_label_and_manifest_served_and_written(sim_proxy: tuple[str, str], tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET
    from urllib.parse import quote

    import yaml

    from scer_proxy.scer.label import format_sig3
    from scer_proxy.scer.manifest import manifest_sci
    from tests.scer.test_label import _decode_qr

    _sim, proxy = sim_proxy
    model = "meta-llama/Llama-3.1-8B-Instruct"
    submission = asyncio.run(run_bench(proxy, model, concurrency=40, requests=48, repeats=3, progress=False))
    httpx.post(f"{proxy}/scer/submissions", json=submission)
    name = quote(model, safe="")
    svg = httpx.get(f"{proxy}/scer/label/{name}.svg")
    assert svg.status_code == 200 and svg.headers["content-type"].startswith("image/svg+xml")
    root = ET.fromstring(svg.text)
    assert root.get("width") == "260" and root.get("height") == "364"
    manifest_url = _decode_qr(root)
    assert manifest_url == f"{proxy}/scer/manifest/{name}.yaml"
    manifest = yaml.safe_load(httpx.get(manifest_url).text)
    assert f"{format_sig3(manifest_sci(manifest))} gCO2eq per 1,000 output tokens" in svg.text
    assert httpx.get(f"{proxy}/scer/label/{quote('no-such-model', safe='')}.svg").status_code == 404
    # The command line writes the same label from the proxy, and one from the submission file.
    sub_path = tmp_path / "sub.json"
    sub_path.write_text(json.dumps(submission))
    for extra in (["--proxy", proxy], ["--submission", str(sub_path), "--base-url", proxy]):
        out = tmp_path / f"label-{extra[0][2:]}.svg"
        done = subprocess.run(
            [sys.executable, "-m", "scer_proxy", "label", "--model", model, "--out", str(out), *extra],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        written = ET.fromstring(out.read_text())
        assert _decode_qr(written) == manifest_url
        assert yaml.safe_load(out.with_suffix(".yaml").read_text())["name"]


def test_model_size_from_the_servers_model_list() -> None:
    from scer_proxy.scer.benchmark import server_params_b

    listed = [{"id": "tiny", "meta": {"n_params": 7_241_732_096}}, {"id": "other"}]
    assert server_params_b(listed, "tiny") == pytest.approx(7.241732096)
    assert server_params_b(listed, "other") is None and server_params_b(listed, "absent") is None
