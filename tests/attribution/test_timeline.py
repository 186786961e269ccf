"""The timeline's pure core, by tables: token split, prefill placement, deferral, conservation, idle, settling."""

from __future__ import annotations

import math
import random

import pytest

from scer_proxy.attribution.calibration import Calibration
from scer_proxy.attribution.timeline import Timeline, TimelineConfig


def _accounted(tl: Timeline, settled_j: float) -> float:
    in_flight = sum(r.prefill_j + r.decode_j for r in tl.state.requests.values())
    deferred = sum(iv.energy_j for iv in tl.state.intervals)
    return settled_j + in_flight + tl.idle_j + tl.idle_balance_j + deferred


def _decoding(tl: Timeline, rid: str, t: float) -> None:
    tl.start(rid, t, 0)
    tl.tokens(rid, t, 0)  # first chunk, no prompt to prefill


def test_decode_energy_is_split_by_tokens_seen_in_the_interval() -> None:
    tl = Timeline(TimelineConfig(prefill_weight=0.0, idle="separate"))
    tl.reading(0.0, 1000.0)
    _decoding(tl, "a", 0.0)
    _decoding(tl, "b", 0.0)
    tl.tokens("a", 0.5, 10)
    tl.tokens("b", 0.5, 30)
    tl.finish("a", 1.0, 0, 10)
    tl.finish("b", 1.0, 0, 30)
    result = tl.reading(1.0, 1100.0)
    assert result is not None
    shares = {s.rid: s for s in result.settled}
    assert shares["a"].energy_j == pytest.approx(25.0)
    assert shares["b"].energy_j == pytest.approx(75.0)
    assert shares["a"].hw_s + shares["b"].hw_s == pytest.approx(1.0)
    assert all(s.settled for s in shares.values())


def test_fixed_prefill_weight_counts_prompt_tokens_as_decode_equivalents() -> None:
    tl = Timeline(TimelineConfig(prefill_weight=0.5, idle="separate"))
    tl.reading(0.0, 0.0)
    tl.start("p", 0.0, 100)  # 100 prompt tokens x 0.5 = 50 decode-token equivalents
    _decoding(tl, "d", 0.0)
    tl.tokens("d", 0.2, 40)
    tl.tokens("p", 0.5, 10)  # p's first tokens: its prefill is over
    tl.finish("p", 1.0, 100, 10)
    tl.finish("d", 1.0, 0, 40)
    result = tl.reading(1.0, 100.0)
    assert result is not None
    shares = {s.rid: s for s in result.settled}
    # weights: p = 50 + 10, d = 40 -> 60 : 40
    assert shares["p"].energy_j == pytest.approx(60.0)
    assert shares["p"].prefill_j == pytest.approx(50.0)
    assert shares["d"].energy_j == pytest.approx(40.0)


def test_non_streamed_requests_decode_at_the_rate_the_streams_show() -> None:
    tl = Timeline(TimelineConfig(prefill_weight=0.0, idle="separate"))
    tl.reading(0.0, 0.0)
    _decoding(tl, "s", 0.0)
    tl.start("n", 0.0, 0, stream=False)
    tl.reading(0.5, 0.0)  # nothing yet
    tl.tokens("s", 0.75, 20)
    tl.finish("n", 1.0, 0, 20)
    tl.finish("s", 1.0, 0, 20)
    result = tl.reading(1.0, 80.0)
    assert result is not None
    shares = {s.rid: s.energy_j for s in result.settled}
    assert shares["n"] == pytest.approx(shares["s"])  # same rate, same share


def test_first_tokens_arriving_together_pin_one_block_of_prefills() -> None:
    # Three streams queued at t=0; the server prefills all three (prompts 100, 200, 100) before decoding,
    # so every first token arrives at t=0.42; the block spans [0, 0.42 - one step] in prompt proportions.
    tl = Timeline(TimelineConfig(prefill_weight=None, idle="separate", token_interval_s=0.02))
    tl.reading(0.0, 0.0)
    for rid, prompt in (("a", 100), ("b", 200), ("c", 100)):
        tl.start(rid, 0.0, prompt)
    tl.reading(0.2, 100.0)  # deferred: the streams' prefills are not placed yet
    assert tl.deferred_intervals == 1
    for rid in ("a", "b", "c"):
        tl.tokens(rid, 0.42, 1)
    tl.reading(0.4, 200.0)
    assert tl.deferred_intervals == 0
    windows = {r.rid: (r.prefill_lo, r.prefill_hi) for r in tl.state.requests.values()}
    assert windows["a"] == pytest.approx((0.0, 0.1))
    assert windows["b"] == pytest.approx((0.1, 0.3))
    assert windows["c"] == pytest.approx((0.3, 0.4))
    # Prefill-only intervals go to the prompts prefilled in them: [0, 0.2] is a and half of b.
    assert tl.state.requests["a"].prefill_j == pytest.approx(50.0)
    assert tl.state.requests["b"].prefill_j == pytest.approx(50.0 + 200.0 * 2 / 3 / 2, rel=0.5)
    total = sum(r.prefill_j + r.decode_j for r in tl.state.requests.values())
    assert total == pytest.approx(200.0)


def test_deferral_is_bounded_by_max_defer_once_a_request_waits_to_settle() -> None:
    tl = Timeline(TimelineConfig(prefill_weight=0.0, idle="separate", max_defer_s=1.0, max_hold_s=60.0))
    tl.reading(0.0, 0.0)
    tl.start("silent", 0.0, 50)  # a stream whose first token never comes
    tl.start("quick", 0.1, 10, stream=False)
    tl.finish("quick", 0.4, 10, 0)
    tl.reading(0.5, 10.0)
    assert tl.deferred_intervals == 1
    tl.reading(1.6, 30.0)
    assert tl.deferred_intervals == 1  # [0.5, 1.6] is still young
    assert "quick" not in tl.state.requests  # settled with [0, 0.5]
    assert tl.state.requests["silent"].prefill_j + tl.state.requests["silent"].decode_j > 0


def test_an_interval_nobody_waits_on_is_held_for_the_first_token() -> None:
    """A queue of prefills with no first token yet: no request has ended, so its intervals wait for
    the first token that places them (up to ``max_hold_s``) rather than being split at a guessed rate."""
    tl = Timeline(TimelineConfig(prefill_weight=0.0, idle="separate", max_defer_s=1.0, max_hold_s=5.0))
    tl.reading(0.0, 0.0)
    tl.start("long", 0.0, 50_000)
    for i in range(1, 31):
        tl.reading(0.1 * i, 70.0 * i)
    assert tl.deferred_intervals == 30  # 3 s, past max_defer_s
    tl.tokens("long", 3.05, 1)  # its prefill took 3 s
    tl.reading(3.1, 70.0 * 31)
    assert tl.deferred_intervals == 0
    assert tl.learned.prefill_tokens_per_s == pytest.approx(50_000 / 3.05, rel=0.05)
    assert tl.state.requests["long"].prefill_j == pytest.approx(70.0 * 30.5, rel=0.02)
    tl2 = Timeline(TimelineConfig(prefill_weight=0.0, idle="separate", max_defer_s=1.0, max_hold_s=5.0))
    tl2.reading(0.0, 0.0)
    tl2.start("silent", 0.0, 50)
    for i in range(1, 56):
        tl2.reading(0.1 * i, 10.0 * i)
    assert 0 < tl2.deferred_intervals <= 51  # none older than max_hold_s


@pytest.mark.parametrize("idle", ["amortize", "separate"])
@pytest.mark.parametrize("weight", [None, 0.3])
def test_conservation_on_every_interval_random_schedule(idle: str, weight: float | None) -> None:
    rng = random.Random(42)
    tl = Timeline(TimelineConfig(prefill_weight=weight, idle=idle, max_defer_s=0.5))
    energy = 5000.0
    tl.reading(0.0, energy)
    settled_j = 0.0
    t = 0.0
    open_ids: list[str] = []
    for step in range(3000):
        t += rng.uniform(0.001, 0.05)
        action = rng.random()
        if action < 0.15:
            rid = f"r{step}"
            tl.start(rid, t, rng.randint(0, 2000), stream=rng.random() < 0.6)
            open_ids.append(rid)
        elif action < 0.55 and open_ids:
            tl.tokens(rng.choice(open_ids), t, rng.randint(1, 3))
        elif action < 0.65 and open_ids:
            rid = open_ids.pop(rng.randrange(len(open_ids)))
            tl.finish(rid, t, rng.randint(0, 2000), rng.randint(0, 1000))
        else:
            energy += rng.uniform(60, 700) * rng.uniform(0.01, 0.1)
            result = tl.reading(t, energy)
            if result is None:
                continue
            assert result.energy_j == pytest.approx(
                result.attributed_j + result.idle_j + result.carried_j, rel=1e-9, abs=1e-9
            )
            settled_j += sum(s.energy_j for s in result.settled)
            # Attributed (settled and in flight) + idle + carried + deferred equals what the meter measured.
            assert math.isclose(_accounted(tl, settled_j), tl.measured_j, rel_tol=1e-9)
    assert tl.measured_j > 0 and settled_j > 0


def test_idle_amortize_spreads_over_the_window_never_onto_the_next_request() -> None:
    tl = Timeline(TimelineConfig(prefill_weight=0.0, idle="amortize"))
    tl.reading(0.0, 0.0)
    result = tl.reading(1.0, 70.0)  # an idle second at 70 W before any request: in the balance only
    assert result is not None and result.carried_j == pytest.approx(70.0)
    _decoding(tl, "a", 1.0)
    tl.tokens("a", 1.5, 3)
    tl.finish("a", 2.0, 0, 3)
    result = tl.reading(2.0, 570.0)
    assert result is not None
    (share,) = result.settled
    assert share.energy_j == pytest.approx(500.0) and share.idle_j == 0.0
    assert tl.idle_balance_j == pytest.approx(70.0)
    # Ten idle minutes, then a request: it takes the window's idle-to-active ratio of its own active
    # energy, and what the window's requests cannot carry stays in the balance.
    energy = 570.0
    for k in range(1, 601):
        energy += 70.0
        tl.reading(2.0 + k, energy)
    start = 602.0
    _decoding(tl, "b", start)
    tl.tokens("b", start + 0.5, 3)
    tl.finish("b", start + 1.0, 0, 3)
    result = tl.reading(start + 1.0, energy + 500.0)
    assert result is not None
    (share,) = result.settled
    ratio = 600 * 70.0 / (500.0 + 500.0)  # the window's idle over its active energy, b's included
    assert share.energy_j - share.idle_j == pytest.approx(500.0)
    assert share.idle_j == pytest.approx(ratio * 500.0)
    assert tl.idle_balance_j == pytest.approx(70.0 + 600 * 70.0 - ratio * 500.0)
    assert tl.idle_j == 0.0


def test_idle_separate_keeps_idle_apart_even_inside_a_busy_interval() -> None:
    tl = Timeline(TimelineConfig(prefill_weight=0.0, idle="separate"))
    tl.reading(0.0, 0.0)
    tl.reading(1.0, 70.0)  # learns the idle power, 70 W
    _decoding(tl, "a", 1.5)
    tl.tokens("a", 1.7, 3)
    tl.finish("a", 2.0, 0, 3)
    result = tl.reading(2.0, 70.0 + 35.0 + 300.0)  # half idle (35 J), half busy (300 J)
    assert result is not None
    (share,) = result.settled
    assert share.energy_j == pytest.approx(300.0)
    assert tl.idle_j == pytest.approx(105.0)


def test_estimate_prices_the_unsplit_tokens_and_settles_later() -> None:
    tl = Timeline(TimelineConfig(prefill_weight=0.0, idle="separate"))
    tl.reading(0.0, 0.0)
    _decoding(tl, "a", 0.0)
    tl.tokens("a", 0.5, 100)
    tl.reading(1.0, 400.0)  # 100 tokens for 400 J: 4 J a token
    tl.tokens("a", 1.2, 50)
    tl.finish("a", 1.5, 0, 150)
    estimate = tl.estimate("a", 1.5)
    assert estimate is not None and not estimate.settled
    assert estimate.energy_j == pytest.approx(400.0 + 50 * 4.0)
    result = tl.reading(2.0, 620.0)
    assert result is not None
    (share,) = result.settled
    # [1.5, 2] had no request: idle at the interval's mean power (no idle power learned yet), 110 J.
    assert share.settled and share.energy_j == pytest.approx(400.0 + 220.0 - 110.0)
    assert tl.idle_j == pytest.approx(110.0)
    assert tl.estimate("a", 2.0) is None


@pytest.mark.parametrize("true_interval_s", [0.002, 0.02, 0.2])
def test_estimate_of_a_lone_non_stream_does_not_depend_on_the_token_rate_prior(
    true_interval_s: float,
) -> None:
    # No stream shows the token rate and none has been learned (the prior is 20 ms a token): the split
    # counts the request's decode time at that rate, so its unsplit tail must be counted the same way.
    tl = Timeline(TimelineConfig(prefill_weight=0.0, idle="separate"))
    tl.reading(0.0, 0.0)
    tl.start("a", 0.0, 0, stream=False)
    tl.reading(1.0, 300.0)  # 300 W while it runs
    tl.finish("a", 1.5, 0, round(1.5 / true_interval_s))
    estimate = tl.estimate("a", 1.5)
    assert estimate is not None and not estimate.settled
    assert estimate.energy_j == pytest.approx(450.0)  # 1.5 s at 300 W, whatever its token count
    result = tl.reading(1.5, 450.0)
    assert result is not None
    (share,) = result.settled
    assert share.energy_j == pytest.approx(450.0)


@pytest.mark.parametrize("phase_s", [i * 0.005 for i in range(10)])
def test_a_short_non_stream_after_one_other_is_estimated_at_the_learned_rate(phase_s: float) -> None:
    # 60 W idle, 300 W while busy; a 20-token warm-up request (1.5 ms a token), then an 84 ms request,
    # under 100 ms counter readings at every phase. The warm-up's rate (20 tokens, at least
    # FIRST_RATE_MIN_TOKENS) replaces the 20 ms prior, which is ten times too slow here.
    busy = ((1.0, 1.03), (1.5, 1.584))

    def counter_j(t: float) -> float:
        return 60.0 * t + sum(240.0 * max(0.0, min(t, hi) - lo) for lo, hi in busy)

    tl = Timeline(TimelineConfig(prefill_weight=None, idle="separate"))
    events = [(phase_s + 0.05 * i, "read", "") for i in range(40)]
    events += [(1.0, "start", "w"), (1.03, "finish", "w"), (1.5, "start", "a"), (1.584, "finish", "a")]
    estimate = None
    for t, kind, rid in sorted(events):
        if kind == "read":
            tl.reading(t, counter_j(t))
        elif kind == "start":
            tl.start(rid, t, 50 if rid == "w" else 37, stream=False)
        else:
            tl.finish(rid, t, 50 if rid == "w" else 37, 20 if rid == "w" else 60)
            estimate = tl.estimate(rid, t) if rid == "a" else None
    assert tl.learned.token_interval_learned and tl.learned.token_interval_s < 0.002
    assert estimate is not None
    truth_j = counter_j(1.584) - counter_j(1.5)
    assert estimate.energy_j == pytest.approx(truth_j, rel=0.05)


@pytest.mark.parametrize(
    ("stream", "tokens", "replaces", "interval_s"),
    [
        (False, 20, True, 0.002),  # a non-stream long enough replaces the prior
        (False, 4, False, 0.02 + 0.2 * (0.002 - 0.02)),  # a short one only blends in
        (True, 100, False, 0.002),  # a stream's gaps are the ratio of sums: its own at first
    ],
)
def test_which_requests_replace_the_token_rate_prior(
    stream: bool, tokens: int, replaces: bool, interval_s: float
) -> None:
    tl = Timeline(TimelineConfig(prefill_weight=0.0, idle="separate"))
    tl.reading(0.0, 0.0)
    tl.start("r", 0.0, 0, stream=stream)
    for i in range(tokens if stream else 0):
        tl.tokens("r", 0.002 * (i + 1))
    tl.finish("r", 0.002 * (tokens + 1), 0, tokens)  # 2 ms a token, ten times faster than the prior
    assert tl.learned.token_interval_learned is replaces
    assert tl.learned.token_interval_s == pytest.approx(interval_s, rel=0.1)


def test_a_short_stream_held_up_by_a_prefill_weighs_as_one_gap() -> None:
    """The time per token is the ratio of sums over streams: a two-token stream whose tokens a long
    prefill held 0.7 s apart moves it by one gap, not by a stream's worth; and the decode step is the
    lower quartile of per-stream gaps, not pulled up by such a gap at all."""
    tl = Timeline(TimelineConfig(prefill_weight=0.0, idle="separate"))
    tl.reading(0.0, 0.0)
    t = 0.0
    for n in range(10):
        rid = f"s{n}"
        tl.start(rid, t, 0)
        for _ in range(100):
            t += 0.01
            tl.tokens(rid, t)
        tl.finish(rid, t, 0, 100)
    tl.start("held", t, 0)
    tl.tokens("held", t + 0.01)
    tl.tokens("held", t + 0.71)
    tl.finish("held", t + 0.71, 0, 2)
    assert tl.learned.token_interval_s == pytest.approx(0.0107, rel=0.05)
    assert tl.learned.step_s() == pytest.approx(0.01, rel=1e-6)


def test_counter_going_backwards_attributes_nothing_and_recovers() -> None:
    tl = Timeline(TimelineConfig(prefill_weight=0.0, idle="separate"))
    tl.reading(0.0, 1000.0)
    _decoding(tl, "a", 0.0)
    tl.tokens("a", 0.5, 5)
    result = tl.reading(1.0, 10.0)  # driver reload: the counter restarted
    assert result is not None and result.energy_j == 0.0 and result.attributed_j == 0.0
    tl.tokens("a", 1.5, 5)
    tl.finish("a", 2.0, 0, 10)
    result = tl.reading(2.0, 110.0)
    assert result is not None
    assert result.settled[0].energy_j == pytest.approx(100.0)


def test_calibration_recovers_known_coefficients() -> None:
    rng = random.Random(3)
    calibration = Calibration(window=10_000)
    truth = (0.022, 3.3, 0.05, 70.0)  # J per prompt token, J per step, J per decode token, idle W
    for _ in range(300):
        x = (rng.uniform(0, 3000), rng.uniform(0, 12), rng.uniform(0, 400), rng.uniform(0, 0.05))
        calibration.add(x, sum(a * b for a, b in zip(truth, x, strict=True)))
    solution = calibration.solve()
    assert solution is not None
    assert solution == pytest.approx(list(truth), rel=1e-6)


def test_calibration_solved_at_every_interval_equals_the_full_enumeration() -> None:
    """The warm start from the last solution's free coefficients gives the same optimum as trying every
    subset, interval after interval, while the optimum's free set grows and shrinks."""
    rng = random.Random(11)
    checked = boundary = 0
    for _ in range(40):
        calibration = Calibration(window=rng.choice([16, 64, 512]))
        truth = [rng.choice([0.0, rng.random()]) for _ in range(4)]
        noise = rng.choice([0.01, 1.0, 10.0])
        for _ in range(60):
            x = (
                rng.random() * 100 * (rng.random() < 0.7),
                rng.random() * 30,
                rng.random() * 100,
                rng.random() * 0.05,
            )
            calibration.add(x, sum(t * v for t, v in zip(truth, x, strict=True)) + rng.gauss(0, noise))
            calibration.intervals_with_prefill = max(calibration.intervals_with_prefill, 100)
            expected = calibration._by_enumeration()
            assert calibration.solve() == expected
            checked += 1
            boundary += expected is not None and 0.0 in expected
    assert checked == 2400 and boundary > 200  # many optima on the boundary, where the free set changes


def test_calibration_never_goes_negative() -> None:
    calibration = Calibration()
    for i in range(50):
        # Energy falls as prompt tokens rise: the unconstrained fit would give a negative prompt cost.
        calibration.add((float(i), 10.0, 100.0, 0.0), 500.0 - i)
    solution = calibration.solve()
    assert solution is not None and all(c >= 0 for c in solution)


def test_decode_time_is_shared_by_the_batch_at_each_instant() -> None:
    """A request decoding alone holds the whole step; two together hold half each; a prefill
    window holds the GPU alone, so nobody's decode share runs through it."""
    from scer_proxy.attribution.split import decode_time_shares
    from scer_proxy.attribution.state import OpenRequest

    a = OpenRequest("a", start_s=0.0, prompt_tokens=1, decode_from=0.0)
    b = OpenRequest("b", start_s=0.0, prompt_tokens=1, decode_from=0.5, end_s=0.9)
    c = OpenRequest("c", start_s=0.9, prompt_tokens=1, prefill_lo=0.9, prefill_hi=1.0, decode_from=1.0)
    shares = decode_time_shares([a, b, c], 0.0, 1.0)
    assert shares["a"] == pytest.approx(0.5 + 0.4 / 2)
    assert shares["b"] == pytest.approx(0.4 / 2)
    assert "c" not in shares  # its decode starts at the interval's end
    assert sum(shares.values()) == pytest.approx(0.9)  # the prefill's 0.1 s is no one's decode time


def test_the_prefill_power_is_learned_beside_the_decode_power() -> None:
    """Intervals with more and less prefill in them tell a prefill's power from a decode step's."""
    from scer_proxy.attribution.learned import Learned

    learned = Learned()
    assert learned.prefill_power_ratio() is None  # nothing seen yet
    rng = random.Random(5)
    for _ in range(100):
        prefill_s = rng.uniform(0.0, 0.05)
        other_s = 0.1 - prefill_s
        learned.learn_phases(prefill_s, other_s, 690.0 * prefill_s + 486.0 * other_s)
    assert learned.prefill_power_ratio() == pytest.approx(690.0 / 486.0, rel=1e-6)
    absurd = Learned()
    for _ in range(100):
        prefill_s = rng.uniform(0.0, 0.05)
        absurd.learn_phases(prefill_s, 0.1 - prefill_s, 5000.0 * prefill_s + 100.0 * (0.1 - prefill_s))
    assert absurd.prefill_power_ratio() is None  # 50x: misplaced prefills, not a GPU


def test_a_prefill_waits_for_the_step_a_non_stream_was_finishing() -> None:
    """A request that arrives while a one-token non-stream's decode step runs is prefilled after that
    step ends (its end), so the step keeps its whole time."""
    tl = Timeline(TimelineConfig(prefill_weight=0.0, idle="separate"))
    tl.learned.prefill_tokens_per_s = 10_000.0
    tl.learned.prefill_samples = 1
    tl.learned.token_interval_s, tl.learned.token_interval_samples = 0.008, 1
    tl.reading(0.0, 0.0)
    tl.start("a", 0.010, 100, stream=False)  # prefill 10 ms, then one 8 ms step
    tl.start("b", 0.024, 50, stream=False)  # arrives during a's step
    tl.finish("a", 0.028, 100, 1)
    tl.finish("b", 0.041, 50, 1)  # prefill 0.028-0.033, step 0.033-0.041
    b = tl.state.requests["b"]
    assert b.prefill_lo == pytest.approx(0.028, abs=1e-9)


def test_an_estimated_prefill_waits_for_the_step_in_progress() -> None:
    """A request queued while a step runs is placed, before its first token, after that step's end."""
    tl = Timeline(TimelineConfig(prefill_weight=0.0, idle="separate"))
    tl.learned.prefill_tokens_per_s = 10_000.0
    tl.learned.prefill_samples = 1
    tl.reading(0.0, 0.0)
    tl.start("s", 0.0, 10)
    t = 0.0
    for _ in range(20):  # a stream decoding in 10 ms steps
        t += 0.010
        tl.tokens("s", t)
    tl.start("q", t + 0.004, 50)  # arrives 4 ms into a step that ends at t + 0.010
    tl.tokens("s", t + 0.010)
    tl.reading(t + 0.011, 10.0)
    q = tl.state.requests["q"]
    assert not q.pinned
    assert q.prefill_lo == pytest.approx(t + 0.010)
    assert q.prefill_hi == pytest.approx(t + 0.010 + 50 / tl.learned.prefill_tokens_per_s)


def test_the_proxys_timing_noise_widens_a_short_requests_bound() -> None:
    """A late event loop stamps a request's events late: the bound grows with that noise over the
    request's duration, much for a 30 ms request, little for a 10 s one; a punctual loop adds nothing."""

    def bound(duration_s: float, late_s: float | None) -> float:
        tl = Timeline(TimelineConfig(prefill_weight=0.0, idle="separate"))
        for _ in range(50):
            if late_s is not None:
                tl.note_timing(late_s)
        tl.reading(0.0, 0.0)
        tl.start("r", 0.0, 10)
        tl.tokens("r", duration_s / 2)
        tl.finish("r", duration_s, 10, 2)
        t, settled = 0.1, None
        while settled is None:
            result = tl.reading(t, 100.0 * t)
            settled = next((s for s in result.settled if s.rid == "r"), None) if result else None
            t += 0.1
        assert settled.uncertainty_rel is not None
        return settled.uncertainty_rel

    assert Timeline(TimelineConfig()).state.timing_noise_s == 0.0
    assert bound(0.03, 0.010) > bound(0.03, None) + 0.5
    assert bound(10.0, 0.010) - bound(10.0, None) < 0.003


def test_a_response_time_figure_counts_the_decode_time_held_at_the_decode_power() -> None:
    """Before its interval is split, a request's figure is what the split will give it: its prefill
    window at the prefill power and its decode time, shared with the others decoding, at the decode
    power (the token price of the last interval is off for a step run by a different batch)."""
    tl = Timeline(TimelineConfig(prefill_weight=0.0, idle="separate"))
    rng = random.Random(2)
    for _ in range(50):
        prefill_s = rng.uniform(0.0, 0.05)
        tl.learned.learn_phases(prefill_s, 0.1 - prefill_s, 690.0 * prefill_s + 486.0 * (0.1 - prefill_s))
    tl.learned.prefill_tokens_per_s, tl.learned.prefill_samples = 10_000.0, 1
    tl.learned.token_interval_s, tl.learned.token_interval_samples = 0.010, 1
    tl.reading(0.0, 0.0)
    tl.start("a", 0.000, 100)  # prefill 0-10 ms, then decoding
    tl.tokens("a", 0.020)
    tl.start("b", 0.020, 100, stream=False)  # prefill 20-30 ms, decodes beside a until 60 ms
    for t in (0.040, 0.050, 0.060):
        tl.tokens("a", t)
    tl.finish("b", 0.060, 100, 3)
    share = tl.estimate("b", 0.060)
    assert share is not None and not share.settled
    b = tl.state.requests["b"]
    decode_s = 0.060 - b.decode_from
    assert share.prefill_j == pytest.approx(690.0 * (b.prefill_hi - b.prefill_lo), rel=1e-6)
    assert share.decode_j == pytest.approx(486.0 * decode_s / 2, rel=1e-6)  # two decoding all along


def test_one_requests_decode_time_held_agrees_with_the_whole_sweep() -> None:
    from scer_proxy.attribution.split import decode_time_held, decode_time_shares
    from scer_proxy.attribution.state import OpenRequest

    rng = random.Random(3)
    for _ in range(300):
        reqs = []
        for i in range(rng.randint(1, 12)):
            start = rng.uniform(0, 1)
            lo = start + rng.uniform(0, 0.1)
            hi = lo + rng.uniform(0, 0.05)
            end = None if rng.random() < 0.3 else hi + rng.uniform(0, 0.5)
            reqs.append(
                OpenRequest(f"r{i}", start, 1, prefill_lo=lo, prefill_hi=hi, decode_from=hi, end_s=end)
            )
        t0, t1 = sorted([rng.uniform(0, 1.2), rng.uniform(0, 1.2)])
        shares = decode_time_shares(reqs, t0, t1)
        for r in reqs:
            assert decode_time_held(r, reqs, t0, t1) == pytest.approx(shares.get(r.rid, 0.0), abs=1e-12)
