"""The in-process counters behind ``/metrics``: final figures counted once, never lowered; bounded labels."""

from __future__ import annotations

import pytest

from scer_proxy.carbon.records import Record
from scer_proxy.config import ConfigError, load_config
from scer_proxy.summary.metrics import (
    CARBON,
    COMPLETION,
    EMBODIED,
    ENERGY,
    OPERATIONAL,
    OTHER_MODEL,
    REQUESTS,
    TOKENS,
    Counters,
    literal_models,
)


def record(rid: str = "r1", model: str = "m", **over: object) -> Record:
    fields: dict[str, object] = dict(
        request_id=rid,
        model=model,
        upstream="up",
        tenant="t",
        endpoint="chat",
        stream=False,
        started_at=1.0,
        ended_at=2.0,
        status="ok",
        prompt_tokens=10,
        completion_tokens=20,
        energy_j=100.0,
        energy_source="nvml",
        carbon_operational_g=0.01,
        carbon_embodied_g=0.002,
        carbon_g=0.012,
        settled=False,
    )
    fields.update(over)
    return Record(**fields)  # type: ignore[arg-type]


def test_a_settlement_that_lowers_the_figure_never_lowers_a_counter() -> None:
    counters = Counters(wall_clock=lambda: 5.0)
    counters.observe(record(energy_j=100.0))  # the response-time figure: unsettled, not counted
    assert counters.value(ENERGY, "m", "up", "nvml") == 0.0
    snap = counters.snapshot()
    assert snap.unsettled == {"up": (1, 100.0)}
    counters.observe(record(energy_j=80.0, settled=True))  # settled lower: counted once, at 80
    assert counters.value(ENERGY, "m", "up", "nvml") == 80.0
    assert counters.value(REQUESTS, "m", "up", "ok") == 1.0
    assert counters.value(TOKENS, "m", "up", COMPLETION) == 20.0
    assert counters.value(CARBON, "m", "up", OPERATIONAL) == 0.01
    assert counters.value(CARBON, "m", "up", EMBODIED) == 0.002
    assert counters.snapshot().unsettled == {}
    hist = counters.snapshot().histograms[("m", "up")]
    assert hist.count == 1 and hist.sum == 80.0
    assert counters.snapshot().created[(ENERGY.name, ("m", "up", "nvml"))] == 5.0


def test_records_without_energy_are_final_at_once_and_running_ones_never_count() -> None:
    counters = Counters()
    counters.observe(record("a", status="running", energy_j=None))
    assert counters.value(REQUESTS, "m", "up", "running") == 0.0
    counters.observe(record("b", status="upstream_error", energy_j=None, energy_source="none"))
    assert counters.value(REQUESTS, "m", "up", "upstream_error") == 1.0
    assert counters.value(ENERGY, "m", "up", "none") == 0.0 and not counters.snapshot().histograms


def test_model_labels_beyond_the_cap_are_other() -> None:
    counters = Counters(configured=frozenset({"named"}), max_models=2)
    for i, model in enumerate(["a", "b", "c", "d", "named", "a"]):
        counters.observe(record(f"r{i}", model=model, settled=True))
    assert [counters.value(REQUESTS, m, "up", "ok") for m in ("a", "b", OTHER_MODEL, "named")] == [2, 1, 2, 1]
    assert counters.value(REQUESTS, "c", "up", "ok") == 0.0


def test_unsettled_records_are_bounded() -> None:
    counters = Counters(max_unsettled=3)
    for i in range(10):
        counters.observe(record(f"r{i}"))
    assert counters.snapshot().unsettled == {"up": (3, 300.0)}


def test_literal_models_are_the_patterns_without_globs() -> None:
    assert literal_models(["*", "llama-3", "qwen-*", "a?c", "[ab]", "mistral"]) == {"llama-3", "mistral"}


def test_metrics_and_public_labels_keys() -> None:
    config = load_config(environ={"SCER_METRICS_MAX_MODELS": "7", "SCER_SERVER_PUBLIC_LABELS": "false"})
    assert config.metrics.max_models == 7 and config.server.public_labels is False
    assert load_config().metrics.max_models == 100 and load_config().server.public_labels is True
    with pytest.raises(ConfigError, match=r"^metrics\.max_models"):
        load_config(environ={"SCER_METRICS_MAX_MODELS": "-1"})
