"""Simulator profiles: built from the bundled ML.ENERGY rows, interpolated and clamped exactly."""

from __future__ import annotations

import csv
import io
from importlib import resources

import pytest

from scer_proxy.sim import DEFAULT_PROFILE, UnknownProfileError, get_profile, list_profiles, profile_name
from scer_proxy.sim.profiles import PREFILL_MFU, Profile


def _chat_rows(model_id: str, gpu_model: str, num_gpus: int) -> list[dict[str, str]]:
    text = (resources.files("scer_proxy") / "data" / "mlenergy-v3-llm.csv").read_text(encoding="utf-8")
    return [
        r
        for r in csv.DictReader(io.StringIO(text))
        if r["task"] == "lm-arena-chat"
        and r["model_id"] == model_id
        and r["gpu_model"] == gpu_model
        and int(r["num_gpus"]) == num_gpus
    ]


def test_named_profiles_match_their_configurations() -> None:
    p8 = get_profile("llama-3.1-8b-h100")
    assert (p8.model_id, p8.gpu_model, p8.num_gpus, p8.params_b) == (
        "meta-llama/Llama-3.1-8B-Instruct",
        "H100",
        1,
        8.0,
    )
    p70 = get_profile("llama-3.1-70b-h100x4")
    assert (p70.model_id, p70.gpu_model, p70.num_gpus) == ("meta-llama/Llama-3.1-70B-Instruct", "H100", 4)
    assert get_profile() == p8
    assert DEFAULT_PROFILE == "llama-3.1-8b-h100"


def test_batch_points_are_the_csv_rows() -> None:
    profile = get_profile("llama-3.1-8b-h100")
    rows = sorted(_chat_rows(profile.model_id, "H100", 1), key=lambda r: float(r["avg_batch_size"]))
    assert len(profile.batch_points) == len(rows) == 11
    for (batch, step_s, power_w), row in zip(profile.batch_points, rows, strict=True):
        assert batch == float(row["avg_batch_size"])
        assert step_s == float(row["median_itl_ms"]) / 1000.0
        assert power_w == float(row["avg_power_watts"])
        # at a measured point the interpolation returns the measurement itself
        assert profile.step_time_s(batch) == pytest.approx(step_s, rel=1e-12)
        assert profile.power_w(batch) == pytest.approx(power_w, rel=1e-12)
    assert profile.max_num_seqs == max(int(r["max_num_seqs"]) for r in rows) == 768


def test_interpolation_is_linear_between_rows_and_clamped_outside() -> None:
    profile = get_profile("llama-3.1-8b-h100")
    (b0, s0, p0), (b1, s1, p1) = profile.batch_points[0], profile.batch_points[1]
    mid = (b0 + b1) / 2
    assert profile.step_time_s(mid) == pytest.approx((s0 + s1) / 2, rel=1e-12)
    assert profile.power_w(mid) == pytest.approx((p0 + p1) / 2, rel=1e-12)
    quarter = b0 + (b1 - b0) / 4
    assert profile.power_w(quarter) == pytest.approx(p0 + (p1 - p0) / 4, rel=1e-12)
    # batch 1 is below the smallest measured batch (about 8): clamped to it
    assert profile.step_time_s(1) == s0 == pytest.approx(0.007316112, rel=1e-12)
    assert profile.power_w(1) == p0 == pytest.approx(486.438054, rel=1e-12)
    last = profile.batch_points[-1]
    assert profile.step_time_s(10_000) == last[1]
    assert profile.power_w(10_000) == last[2]


def test_derived_quantities_follow_the_documented_assumptions() -> None:
    p8 = get_profile("llama-3.1-8b-h100")
    assert p8.idle_power_w == 70.0
    assert p8.prefill_tokens_per_s == pytest.approx(PREFILL_MFU * 989e12 / (2 * 8e9))
    assert p8.prefill_power_w == max(p[2] for p in p8.batch_points)
    assert p8.max_model_len == 131072
    p70 = get_profile("llama-3.1-70b-h100x4")
    assert p70.idle_power_w == 4 * 70.0
    assert p70.prefill_tokens_per_s == pytest.approx(PREFILL_MFU * 989e12 * 4 / (2 * 70e9))
    b200 = get_profile("llama-3.1-8b-b200")
    assert b200.idle_power_w == 140.0
    assert b200.gpu_product_name == "NVIDIA B200"
    assert p8.gpu_product_name == "NVIDIA H100 80GB HBM3"


def test_every_chat_configuration_has_a_loadable_profile() -> None:
    text = (resources.files("scer_proxy") / "data" / "mlenergy-v3-llm.csv").read_text(encoding="utf-8")
    configs = {
        (r["model_id"], r["gpu_model"], int(r["num_gpus"]))
        for r in csv.DictReader(io.StringIO(text))
        if r["task"] == "lm-arena-chat"
    }
    names = list_profiles()
    assert len(names) == len(configs) == len(set(names))
    assert {profile_name(*c) for c in configs} == set(names)
    for name in names:
        profile = get_profile(name)
        assert isinstance(profile, Profile)
        assert profile.name == name
        assert profile.step_time_s(1) > 0 and profile.power_w(1) > profile.idle_power_w
        assert profile.prefill_tokens_per_s > 0 and profile.max_model_len >= 32768


def test_unknown_profile_names_the_valid_ones() -> None:
    with pytest.raises(KeyError) as info:
        get_profile("gpt-5-on-a-toaster")
    message = str(info.value)
    assert (
        "gpt-5-on-a-toaster" in message
        and "llama-3.1-8b-h100" in message
        and "llama-3.1-70b-h100x4" in message
    )
    assert isinstance(info.value, ValueError) and isinstance(info.value, UnknownProfileError)
