"""SCI arithmetic against hand-computed figures."""

from __future__ import annotations

import dataclasses
import random
from decimal import Decimal

import pytest

from scer_proxy.attribution.timeline import Share
from scer_proxy.carbon.grid import annual_table
from scer_proxy.carbon.records import Record, format_number
from scer_proxy.carbon.sci import Embodied, operational_g, request_carbon, sci_per_1k
from scer_proxy.config import CarbonConfig, ConfigError, load_config
from scer_proxy.grid.providers import configured_intensity

H100_NODE = Embodied(gpu_kg=164.0, server_kg=2500.0, gpus_per_server=8, lifetime_years=4.0, gpus_used=1)


def test_operational_is_kwh_times_intensity() -> None:
    # 3,600 J = 0.001 kWh; at 400 g/kWh -> 0.4 g
    assert operational_g(3600.0, 400.0) == pytest.approx(0.4)


def test_embodied_share_of_gpu_and_server_over_lifetime() -> None:
    # (164 kg + 2500 kg / 8) = 476.5 kg = 476,500 g over 4 years of 365.25 days
    seconds = 4 * 365.25 * 86400
    assert H100_NODE.total_g == pytest.approx(476_500.0)
    assert H100_NODE.grams_for(seconds) == pytest.approx(476_500.0)
    assert H100_NODE.grams_for(3600.0) == pytest.approx(476_500.0 * 3600.0 / seconds)


def test_request_carbon_and_sci_per_1000_units() -> None:
    carbon = request_carbon(
        energy_j=7200.0, hw_s=10.0, intensity_g_per_kwh=250.0, embodied=H100_NODE, units=500
    )
    expected_m = 476_500.0 * 10.0 / (4 * 365.25 * 86400)
    assert carbon.operational_g == pytest.approx(0.5)
    assert carbon.embodied_g == pytest.approx(expected_m)
    assert carbon.sci_g_per_unit == pytest.approx((0.5 + expected_m) * 2)
    assert sci_per_1k(1.0, 0) is None


def test_record_applies_pue_and_uses_input_tokens_for_embeddings() -> None:
    share = Share("r", energy_j=1000.0, prefill_j=200.0, decode_j=800.0, hw_s=2.0, settled=True)
    base = Record(
        request_id="r",
        model="m",
        upstream="u",
        tenant="t",
        endpoint="embeddings",
        stream=False,
        started_at=0.0,
        prompt_tokens=2000,
        completion_tokens=0,
    )
    rec = base.with_energy(
        share,
        source="simulated",
        pue=1.5,
        intensity_g_per_kwh=360.0,
        grid_source="static",
        embodied=H100_NODE,
    )
    assert rec.energy_j == pytest.approx(1500.0)
    assert rec.energy_prefill_j == pytest.approx(300.0)
    assert rec.carbon_operational_g == pytest.approx(1500.0 / 3.6e6 * 360.0)
    assert rec.sci == pytest.approx(rec.carbon_g * 1000.0 / 2000)  # type: ignore[operator]
    headers = rec.headers()
    assert headers["X-SCER-Energy-J"] == "1500"
    assert "e" not in headers["X-SCER-Carbon-Embodied-gCO2e"].lower()
    assert "X-SCER-SCI" in headers
    chat = Record(
        request_id="r",
        model="m",
        upstream="u",
        tenant="t",
        endpoint="chat",
        stream=False,
        started_at=0.0,
        prompt_tokens=10,
        completion_tokens=0,
    )
    assert (
        "X-SCER-SCI"
        not in chat.with_energy(
            share,
            source="simulated",
            pue=1.0,
            intensity_g_per_kwh=1.0,
            grid_source="static",
            embodied=H100_NODE,
        ).headers()
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1500.0, "1500"),
        (0.000123456789, "0.000123456789"),
        (1.5e-9, "0.0000000015"),
        (0.0, "0"),
        (12.5, "12.5"),
    ],
)
def test_numbers_are_plain_decimals(value: float, text: str) -> None:
    assert format_number(value) == text


def test_numbers_have_nine_significant_digits_at_every_magnitude() -> None:
    """Against the plain rule (9 significant digits through Decimal, trailing zeros dropped), including
    values that round up to the next power of ten."""

    def by_decimal(value: float) -> str:
        text = format(Decimal(f"{value:.9g}"), "f")
        return text.rstrip("0").rstrip(".") if "." in text else text

    rng = random.Random(7)
    values = [9.9999999996e-6, 9.999999994e-6, 1e-5, 5e-324, 1e-300, 123456789012.0, 1.7e308, 0.5]
    values += [rng.random() * 10.0 ** rng.uniform(-30, 15) for _ in range(20_000)]
    for value in values:
        assert format_number(value) == by_decimal(value), value
        assert format_number(-value) == by_decimal(-value), value


def test_evolve_is_dataclasses_replace() -> None:
    record = Record(
        request_id="r",
        model="m",
        upstream="u",
        tenant="t",
        endpoint="chat",
        stream=True,
        started_at=1.0,
        flags=("a",),
    )
    changes = {"ended_at": 2.5, "status": "ok", "completion_tokens": 7, "energy_j": 1.25, "flags": ("b",)}
    assert record.evolve(**changes) == dataclasses.replace(record, **changes)
    assert record.evolve() == record and record.evolve() is not record
    assert record.status == "running"  # the original is untouched
    with pytest.raises(TypeError, match="no field 'energy'"):
        record.evolve(energy=1.0)


def test_grid_table_and_override() -> None:
    assert len(annual_table()) > 200
    fra = configured_intensity(CarbonConfig(region="FRA"))
    assert fra.intensity_g_per_kwh == annual_table()["FRA"][0] and fra.source == "table:FRA"
    assert configured_intensity(CarbonConfig(intensity_g_per_kwh=123.0)).intensity_g_per_kwh == 123.0
    with pytest.raises(ConfigError, match=r"carbon\.region"):
        configured_intensity(CarbonConfig(region="ZZZ"))


@pytest.mark.parametrize(
    # energy J, PUE, intensity g/kWh, hardware s, preset, output tokens -> operational g, embodied g (by hand)
    ("energy_j", "pue", "intensity", "hw_s", "preset", "tokens", "operational_g", "embodied_g"),
    [
        # 36,000 J x 1.0 = 0.01 kWh x 400 = 4 g; H100: (164 + 2500/8) kg = 476.5 kg over 4 y, 60 s
        (36_000.0, 1.0, 400.0, 60.0, "h100", 500, 4.0, 476_500.0 * 60 / (4 * 365.25 * 86400)),
        # PUE 1.5: 0.015 kWh x 100 = 1.5 g; A100: (150 + 312.5) kg over 6 y, 3,600 s
        (36_000.0, 1.5, 100.0, 3600.0, "a100", 1000, 1.5, 462_500.0 * 3600 / (6 * 365.25 * 86400)),
        # CPU server: 2,500 kg over 4 y for 10 s; 720 J = 0.0002 kWh x 50 = 0.01 g
        (720.0, 1.0, 50.0, 10.0, "cpu-server", 100, 0.01, 2_500_000.0 * 10 / (4 * 365.25 * 86400)),
    ],
)
def test_sci_against_hand_computed_table(
    energy_j: float,
    pue: float,
    intensity: float,
    hw_s: float,
    preset: str,
    tokens: int,
    operational_g: float,
    embodied_g: float,
) -> None:
    config = load_config(overrides={"embodied": {"preset": preset}, "carbon": {"pue": pue}})
    embodied = Embodied(
        gpu_kg=config.embodied.gpu_kg,
        server_kg=config.embodied.server_kg,
        gpus_per_server=config.embodied.gpus_per_server,
        lifetime_years=config.embodied.lifetime_years,
        gpus_used=1,
    )
    share = Share("r", energy_j, 0.0, energy_j, hw_s, settled=True)
    base = Record(
        request_id="r",
        model="m",
        upstream="u",
        tenant="t",
        endpoint="chat",
        stream=False,
        started_at=0.0,
        prompt_tokens=10,
        completion_tokens=tokens,
    )
    rec = base.with_energy(
        share,
        source="nvml",
        pue=config.carbon.pue,
        intensity_g_per_kwh=intensity,
        grid_source="static",
        embodied=embodied,
    )
    assert rec.energy_j == pytest.approx(energy_j * pue)
    assert rec.carbon_operational_g == pytest.approx(operational_g)
    assert rec.carbon_embodied_g == pytest.approx(embodied_g)
    assert rec.sci == pytest.approx((operational_g + embodied_g) * 1000 / tokens)
    as_json = rec.to_json()
    assert as_json["sci_per_request_g"] == pytest.approx(operational_g + embodied_g)
    assert as_json["sci_per_1k_total_tokens"] == pytest.approx(
        (operational_g + embodied_g) * 1000 / (tokens + 10)
    )


def test_embodied_preset_values_can_be_overridden_key_by_key() -> None:
    config = load_config(overrides={"embodied": {"preset": "b200", "lifetime_years": 5}})
    assert config.embodied.gpu_kg == 287.0 and config.embodied.lifetime_years == 5.0
    with pytest.raises(ConfigError, match=r"embodied\.preset"):
        load_config(overrides={"embodied": {"preset": "tpu"}})
