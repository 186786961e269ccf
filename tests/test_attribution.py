"""The timeline's pure core, by tables: conservation on every interval, settling, idle policies."""

from __future__ import annotations

import math
import random

import pytest

from scer_proxy.attribution import Timeline


def _total_accounted(tl: Timeline, settled_j: float) -> float:
    in_flight = sum(r.prefill_j + r.decode_j for r in tl._requests.values())
    return settled_j + in_flight + tl.idle_j + tl.pending_idle_j


def test_two_equal_decoders_split_an_interval_equally() -> None:
    tl = Timeline(prefill_weight=0.0, idle="separate")
    tl.reading(0.0, 1000.0)
    tl.start("a", 0.0, 0)
    tl.first_token("a", 0.0)
    tl.start("b", 0.0, 0)
    tl.first_token("b", 0.0)
    tl.finish("a", 1.0, 0, 10)
    tl.finish("b", 1.0, 0, 10)
    result = tl.reading(1.0, 1100.0)
    assert result is not None
    shares = {s.rid: s for s in result.settled}
    assert shares["a"].energy_j == pytest.approx(50.0)
    assert shares["b"].energy_j == pytest.approx(50.0)
    assert shares["a"].hw_s == pytest.approx(0.5)
    assert all(s.settled for s in shares.values())


def test_decode_time_weights_and_prefill_split() -> None:
    # "a" decodes all of [0, 2]; "b" decodes [1, 2]: weights 2 : 1 with no prefill weight.
    tl = Timeline(prefill_weight=0.0, idle="separate")
    tl.reading(0.0, 0.0)
    tl.start("a", 0.0, 0)
    tl.first_token("a", 0.0)
    tl.start("b", 1.0, 0)
    tl.first_token("b", 1.0)
    tl.finish("a", 2.0, 0, 5)
    tl.finish("b", 2.0, 0, 5)
    result = tl.reading(2.0, 300.0)
    assert result is not None
    shares = {s.rid: s.energy_j for s in result.settled}
    assert shares == pytest.approx({"a": 200.0, "b": 100.0})


def test_prefill_weight_counts_prompt_tokens() -> None:
    tl = Timeline(prefill_weight=1.0, idle="separate", step_time_s=0.01, prefill_tokens_per_s=1e9)
    tl.reading(0.0, 0.0)
    tl.start("p", 0.0, 100)  # 100 prompt tokens x 1.0 x 0.01 s = 1.0 weight of prefill
    tl.first_token("p", 0.0)
    tl.start("d", 0.0, 0)
    tl.first_token("d", 0.0)
    tl.finish("p", 1.0, 100, 1)
    tl.finish("d", 1.0, 0, 1)
    result = tl.reading(1.0, 30.0)
    assert result is not None
    shares = {s.rid: s for s in result.settled}
    # p: prefill 1.0 + decode 1.0; d: decode 1.0 -> 2 : 1
    assert shares["p"].energy_j == pytest.approx(20.0)
    assert shares["p"].prefill_j == pytest.approx(10.0)
    assert shares["p"].decode_j == pytest.approx(10.0)
    assert shares["d"].energy_j == pytest.approx(10.0)


@pytest.mark.parametrize("idle", ["amortize", "separate"])
def test_conservation_on_every_interval_random_schedule(idle: str) -> None:
    rng = random.Random(42)
    tl = Timeline(prefill_weight=0.3, idle=idle)
    energy = 5000.0
    tl.reading(0.0, energy)
    settled_j = 0.0
    t = 0.0
    open_ids: list[str] = []
    for step in range(2000):
        t += rng.uniform(0.01, 0.2)
        action = rng.random()
        if action < 0.3:
            rid = f"r{step}"
            tl.start(rid, t - rng.uniform(0, 0.05), rng.randint(0, 2000))
            open_ids.append(rid)
        elif action < 0.5 and open_ids:
            tl.first_token(rng.choice(open_ids), t)
        elif action < 0.7 and open_ids:
            rid = open_ids.pop(rng.randrange(len(open_ids)))
            tl.finish(rid, t, rng.randint(0, 2000), rng.randint(0, 1000))
        else:
            power = rng.uniform(60, 700)
            energy += power * rng.uniform(0.05, 0.15)
            result = tl.reading(t, energy)
            if result is None:
                continue
            assert result.energy_j == pytest.approx(result.attributed_j + result.idle_j + result.carried_j,
                                                    rel=1e-9, abs=1e-9)
            settled_j += sum(s.energy_j for s in result.settled)
            # Attributed (settled and in flight) + idle + carried equals what the meter measured.
            assert math.isclose(_total_accounted(tl, settled_j), tl.measured_j, rel_tol=1e-9)
    assert tl.measured_j > 0


def test_idle_amortize_goes_to_the_next_busy_requests() -> None:
    tl = Timeline(prefill_weight=0.0, idle="amortize")
    tl.reading(0.0, 0.0)
    result = tl.reading(1.0, 70.0)  # idle second at 70 W
    assert result is not None and result.carried_j == pytest.approx(70.0)
    tl.start("a", 1.0, 0)
    tl.first_token("a", 1.0)
    tl.finish("a", 2.0, 0, 3)
    result = tl.reading(2.0, 570.0)
    assert result is not None
    (share,) = result.settled
    assert share.energy_j == pytest.approx(570.0)
    assert share.hw_s == pytest.approx(2.0)
    assert tl.idle_j == 0.0


def test_idle_separate_keeps_idle_apart_even_inside_a_busy_interval() -> None:
    tl = Timeline(prefill_weight=0.0, idle="separate")
    tl.reading(0.0, 0.0)
    tl.reading(1.0, 70.0)  # learns the idle power, 70 W
    tl.start("a", 1.5, 0)
    tl.first_token("a", 1.5)
    tl.finish("a", 2.0, 0, 3)
    result = tl.reading(2.0, 70.0 + 35.0 + 300.0)  # half idle (35 J), half busy (300 J)
    assert result is not None
    (share,) = result.settled
    assert share.energy_j == pytest.approx(300.0)
    assert tl.idle_j == pytest.approx(105.0)


def test_estimate_adds_the_tail_at_the_latest_power_and_settles_later() -> None:
    tl = Timeline(prefill_weight=0.0, idle="separate")
    tl.reading(0.0, 0.0)
    tl.start("a", 0.0, 0)
    tl.first_token("a", 0.0)
    tl.reading(1.0, 400.0)  # 400 W while "a" decodes
    tl.finish("a", 1.5, 0, 10)
    estimate = tl.estimate("a", 1.5)
    assert estimate is not None and not estimate.settled
    assert estimate.energy_j == pytest.approx(400.0 + 0.5 * 400.0)
    result = tl.reading(2.0, 600.0)  # the real tail: half of [1, 2] busy
    assert result is not None
    (share,) = result.settled
    assert share.settled
    assert tl.estimate("a", 2.0) is None


def test_counter_going_backwards_attributes_nothing_and_recovers() -> None:
    tl = Timeline(prefill_weight=0.0, idle="separate")
    tl.reading(0.0, 1000.0)
    tl.start("a", 0.0, 0)
    tl.first_token("a", 0.0)
    result = tl.reading(1.0, 10.0)  # driver reload: the counter restarted
    assert result is not None and result.energy_j == 0.0 and result.attributed_j == 0.0
    tl.finish("a", 2.0, 0, 4)
    result = tl.reading(2.0, 110.0)
    assert result is not None
    assert result.settled[0].energy_j == pytest.approx(100.0)
