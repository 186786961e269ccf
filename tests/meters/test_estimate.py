"""The estimator (fitted on the bundled ML.ENERGY rows) and the choice ``auto`` makes."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from importlib import resources

import httpx
import pytest

from scer_proxy.attribution.energy_model import fitted_model, j_per_prompt_token, model_params_b
from scer_proxy.attribution.timeline import Timeline
from scer_proxy.meters.estimate import TokenEstimator
from scer_proxy.meters.sampler import UpstreamMeter
from scer_proxy.sim import create_sim_app
from tests.fake_upstream import MODEL
from tests.servers import ThreadedServers


def test_fit_behaves_like_the_measurements() -> None:
    model = fitted_model()
    assert model.rows > 300
    small, large = (model.j_per_output_token(p, 32, "H100", 1) for p in (8, 70))
    assert large > small  # bigger models cost more a token
    assert model.j_per_output_token(8, 128, "H100", 1) < model.j_per_output_token(8, 8, "H100", 1)  # batching
    assert 0.1 < model.uncertainty_rel < 0.6


def test_stated_uncertainty_covers_the_measurements() -> None:
    # The stated one-sigma band holds about two thirds of the measured rows, two sigma about 95 %.
    model = fitted_model()
    text = (resources.files("scer_proxy") / "data" / "mlenergy-v3-llm.csv").read_text()
    rows = [r for r in csv.DictReader(io.StringIO(text)) if r["task"] == "lm-arena-chat"]
    ratios = []
    for r in rows:
        estimate = model.j_per_output_token(
            float(r["activated_params_billions"]),
            float(r["avg_batch_size"]),
            r["gpu_model"],
            int(r["num_gpus"]),
            float(r["total_params_billions"]),
        )
        ratios.append(abs(math.log(estimate / float(r["energy_per_token_joules"]))))
    within_1 = sum(x <= model.sigma_log for x in ratios) / len(ratios)
    within_2 = sum(x <= 2 * model.sigma_log for x in ratios) / len(ratios)
    assert 0.6 <= within_1 <= 0.85
    assert within_2 >= 0.9


def test_prefill_per_token_from_first_principles() -> None:
    # 2 x 8e9 FLOPs at half of 989 TFLOPS, at 700 W: about 0.023 J a prompt token.
    assert j_per_prompt_token(8.0, "H100") == pytest.approx(700 * 2 * 8e9 / (0.5 * 989e12))
    assert j_per_prompt_token(8.0, "B200") < j_per_prompt_token(8.0, "H100")


@pytest.mark.parametrize(
    ("name", "configured", "expected"),
    [
        ("anything", 13.0, (13.0, "configured")),
        ("meta-llama/Llama-3.1-8B-Instruct", 0.0, (8.0, "table")),
        ("Llama-3.1-70B-Instruct", 0.0, (70.0, "table")),
        ("Qwen2.5-7B-Instruct", 0.0, (7.0, "name")),
        ("mistral-7b-v0.3", 0.0, (7.0, "name")),
        ("tiny-llama", 0.0, (8.0, "assumed")),
    ],
)
def test_model_size_sources(name: str, configured: float, expected: tuple[float, str]) -> None:
    assert model_params_b(name, configured) == expected


def test_share_is_settled_at_once_and_flags_an_assumed_size() -> None:
    now = [0.0]
    upstream = UpstreamMeter(
        "local",
        None,
        Timeline(),
        interval_s=0.1,
        on_settled=lambda _upstream, _share: None,
        clock=lambda: now[0],
        estimator=TokenEstimator(gpu="H100", gpus=1),
    )
    for rid in ("r", "b", "c", "d"):  # four running together
        upstream.start_request(rid, 100, stream=False)
    now[0] = 2.0
    share, uncertainty, flags = upstream.finish_request("r", 100, 50, model="tiny-llama")
    assert share is not None and share.settled and flags == ("model_size_assumed",)
    assert share.energy_j == pytest.approx(share.prefill_j + share.decode_j)
    assert share.decode_j == pytest.approx(50 * fitted_model().j_per_output_token(8.0, 4, "H100", 1))
    assert share.hw_s == pytest.approx(0.5)
    assert uncertainty == fitted_model().uncertainty_rel


def test_proxy_with_the_estimate_meter(fake_upstream: str, start_proxy: Callable[..., str]) -> None:
    proxy = start_proxy(fake_upstream, meter={"kind": "estimate"})
    resp = httpx.post(
        f"{proxy}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert resp.headers["x-scer-energy-source"] == "estimate"
    assert float(resp.headers["x-scer-energy-j"]) > 0
    assert float(resp.headers["x-scer-energy-uncertainty"]) == pytest.approx(
        fitted_model().uncertainty_rel, rel=1e-6
    )
    record = httpx.get(f"{proxy}/scer/requests/{resp.headers['x-scer-request-id']}").json()
    assert record["settled"] is True and record["energy_source"] == "estimate"
    assert "model_size_assumed" in record["flags"]  # "fake-model" names no size
    meter = httpx.get(f"{proxy}/scer/summary").json()["meter"]
    assert meter["kind"] == "estimate" and meter["healthy"] is True


def test_auto_estimates_when_nothing_can_be_read(fake_upstream: str, start_proxy: Callable[..., str]) -> None:
    # This machine has no GPU (NVML does not answer) and no readable RAPL; the fake upstream has no counter.
    proxy = start_proxy(fake_upstream, meter={"kind": "auto", "rapl_root": "/nonexistent"})
    health = httpx.get(f"{proxy}/scer/health").json()["meter"]["upstreams"][0]
    assert health["kind"] == "estimate"
    assert "NVML" in health["note"] and "RAPL" in health["note"]


def test_auto_reads_the_simulators_counter(servers: ThreadedServers, start_proxy: Callable[..., str]) -> None:
    sim = servers.start(lambda: create_sim_app(time_scale=20.0))
    proxy = start_proxy(sim, meter={"kind": "auto"})
    health = httpx.get(f"{proxy}/scer/health").json()["meter"]["upstreams"][0]
    assert health["kind"] == "simulated" and "DCGM" in health["note"]
