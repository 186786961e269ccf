"""The continuous-batching engine under a fake clock: exact energy, conservation, batching."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from scer_proxy.sim import Engine, Profile, SeqStatus, get_profile


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def set(self, sim_s: float) -> None:
        """Move to simulated time ``sim_s`` (time_scale 1 in these tests)."""
        self.t = sim_s


def toy_profile(max_num_seqs: int = 2) -> Profile:
    # batch 1: 10 ms at 100 W; batch 4: 20 ms at 400 W; prefill 1000 tok/s at 500 W; idle 50 W.
    return Profile(
        name="toy",
        model_id="toy/model",
        params_b=1.0,
        gpu_model="H100",
        num_gpus=1,
        max_num_seqs=max_num_seqs,
        batch_points=((1.0, 0.010, 100.0), (4.0, 0.020, 400.0)),
        idle_power_w=50.0,
        prefill_tokens_per_s=1000.0,
        prefill_power_w=500.0,
        max_model_len=4096,
    )


def conservation(engine: Engine) -> None:
    truths = sum(s.energy_j for s in engine.records())
    assert engine.counter_j == pytest.approx(engine.attributed_j + engine.idle_j, rel=1e-12)
    assert engine.attributed_j == pytest.approx(truths, rel=1e-9)
    assert engine.counter_j == pytest.approx(truths + engine.idle_j, rel=1e-9)


def test_hand_made_schedule_splits_energy_exactly() -> None:
    clock = FakeClock()
    engine = Engine(toy_profile(), clock=clock)
    a = engine.submit("a", prompt_tokens=100, target_tokens=3)  # prefill [0, 0.1] at 500 W = 50 J
    clock.set(0.105)  # inside a's first decode step [0.1, 0.11] (batch 1: 100 W)
    b = engine.submit("b", prompt_tokens=10, target_tokens=2)
    assert b.truth()["status"] == "queued" and engine.waiting == 1
    assert engine.counter_j == pytest.approx(50.0 + 100.0 * 0.005, rel=1e-12)  # mid-step, linear
    assert a.decode_energy_j == pytest.approx(0.5, rel=1e-12)
    # b is admitted at 0.11 and prefilled [0.11, 0.12] at 500 W = 5 J; then two steps of batch 2:
    # step time 10 + 10/3 ms, power 200 W.
    step2_s = 0.010 + 0.010 / 3
    step2_j = 200.0 * step2_s
    end_s = 0.12 + 2 * step2_s
    clock.set(1.0)
    engine.sync()
    assert a.status is SeqStatus.FINISHED and b.status is SeqStatus.FINISHED
    assert a.completion_tokens == 3 and b.completion_tokens == 2
    assert a.prefill_energy_j == pytest.approx(50.0, rel=1e-12)
    assert a.decode_energy_j == pytest.approx(1.0 + step2_j, rel=1e-12)  # 1 J alone + half of two steps
    assert b.prefill_energy_j == pytest.approx(5.0, rel=1e-12)
    assert b.decode_energy_j == pytest.approx(step2_j, rel=1e-12)
    assert a.arrived_s == 0.0 and a.first_token_s == pytest.approx(0.11)
    assert b.arrived_s == pytest.approx(0.105) and b.first_token_s == pytest.approx(0.12 + step2_s)
    assert a.finished_s == pytest.approx(end_s) and b.finished_s == pytest.approx(end_s)
    assert engine.idle_j == pytest.approx(50.0 * (1.0 - end_s), rel=1e-9)
    assert engine.stats.steps == 3 and engine.stats.step_batches == {1: 1, 2: 2}
    conservation(engine)
    truth = a.truth()
    assert truth["status"] == "finished" and truth["energy_j"] == pytest.approx(51.0 + step2_j)


def test_counter_is_the_exact_integral_whatever_the_sampling() -> None:
    """Advancing in one jump or in thousands of small ones gives the same counter and truths."""

    def run(increments: list[float]) -> tuple[float, list[float]]:
        clock = FakeClock()
        engine = Engine(get_profile("llama-3.1-8b-h100"), clock=clock)
        seqs = [engine.submit(f"r{i}", 50 + 40 * i, 20 + 7 * i) for i in range(5)]
        t = 0.0
        for dt in increments:
            t += dt
            clock.set(t)
            engine.sync()
        return engine.counter_j, [s.energy_j for s in seqs]

    rng = random.Random(7)
    small = [rng.uniform(0.0, 0.003) for _ in range(1000)]
    total = sum(small)
    one_jump = run([total])
    many = run(small)
    assert one_jump[0] == pytest.approx(many[0], rel=1e-9)
    assert one_jump[1] == pytest.approx(many[1], rel=1e-9)


def test_conservation_after_a_mixed_concurrent_run_with_cancellations() -> None:
    clock = FakeClock()
    engine = Engine(get_profile("llama-3.1-8b-h100"), clock=clock)
    rng = random.Random(42)
    t = 0.0
    live = []
    for i in range(300):
        t += rng.expovariate(40.0)
        clock.set(t)
        live.append(engine.submit(f"r{i}", rng.randint(0, 3000), rng.randint(1, 400)))
        if rng.random() < 0.1:
            engine.cancel(rng.choice(live))
        conservation(engine)
    clock.set(t + 60.0)
    engine.sync()
    conservation(engine)
    statuses = {s.status for s in engine.records()}
    assert statuses == {SeqStatus.FINISHED, SeqStatus.CANCELLED}
    for seq in engine.records():
        if seq.status is SeqStatus.FINISHED:
            assert seq.completion_tokens == seq.target_tokens
        assert seq.energy_j >= 0.0
    assert engine.active == engine.waiting == 0 and engine.idle_j > 0.0


def test_batch_is_capped_at_max_num_seqs_and_waiters_are_fifo() -> None:
    clock = FakeClock()
    engine = Engine(toy_profile(max_num_seqs=3), clock=clock)
    seqs = [engine.submit(f"r{i}", 10, 5) for i in range(7)]
    # r0 is prefilled at once (the engine was idle); the others join at the next phase boundary
    assert engine.active == 1 and engine.waiting == 6
    clock.set(0.015)  # r0's prefill ended at 0.01: r1 and r2 were admitted, the rest wait
    engine.sync()
    assert engine.active == 3 and engine.waiting == 4
    assert [s.status for s in seqs[:4]] == [SeqStatus.RUNNING] * 3 + [SeqStatus.QUEUED]
    clock.set(10.0)
    engine.sync()
    assert all(s.status is SeqStatus.FINISHED for s in seqs)
    assert engine.stats.max_batch == 3
    assert max(engine.stats.step_batches) == 3
    firsts = [s.first_token_s for s in seqs]
    assert all(f is not None for f in firsts)
    assert firsts[3] is not None and firsts[2] is not None and firsts[3] > firsts[2]
    conservation(engine)


def test_cancel_leaves_the_batch_before_the_next_step() -> None:
    clock = FakeClock()
    engine = Engine(toy_profile(max_num_seqs=4), clock=clock)
    a = engine.submit("a", 0, 100)  # empty prompt: a decodes alone in [0, 0.01] (1 J)
    b = engine.submit("b", 0, 100)  # admitted at 0.01; then steps of batch 2
    step2_s = 0.010 + 0.010 / 3
    cancel_s = 0.01 + 1.5 * step2_s  # the middle of the second batch-2 step
    clock.set(cancel_s)
    engine.sync()
    assert a.completion_tokens == 2 and b.completion_tokens == 1
    assert a.energy_j == pytest.approx(1.0 + 1.5 * 200.0 * step2_s / 2, rel=1e-12)
    engine.cancel(a)
    assert a.status is SeqStatus.CANCELLED and a.finished_s == pytest.approx(cancel_s)
    clock.set(0.01 + 2 * step2_s + 0.010 * 5)  # the rest of that step, then five steps of b alone
    engine.sync()
    assert a.completion_tokens == 2  # no token from the step it was cancelled in
    # it is charged its half of the whole step it was in (the GPU ran it), and nothing after
    assert a.energy_j == pytest.approx(1.0 + 2 * 200.0 * step2_s / 2, rel=1e-12)
    assert b.completion_tokens == 2 + 5
    assert engine.stats.step_batches == {1: 6, 2: 2}
    assert b.decode_energy_j == pytest.approx(200.0 * step2_s + 5 * 1.0, rel=1e-12)
    conservation(engine)


def test_cancel_of_a_queued_request_costs_nothing() -> None:
    clock = FakeClock()
    engine = Engine(toy_profile(max_num_seqs=1), clock=clock)
    engine.submit("a", 10, 50)
    queued = engine.submit("b", 10, 50)
    clock.set(0.05)
    engine.cancel(queued)
    clock.set(5.0)
    engine.sync()
    assert queued.status is SeqStatus.CANCELLED and queued.energy_j == 0.0 and queued.completion_tokens == 0
    conservation(engine)


def test_published_readings_refresh_only_at_the_period() -> None:
    clock = FakeClock()
    engine = Engine(toy_profile(), clock=clock, metrics_period_s=0.1)
    clock.set(0.05)
    engine.sync()
    assert engine.published.energy_j == 0.0 and engine.counter_j == pytest.approx(2.5)
    clock.set(0.1)
    engine.sync()
    assert engine.published.sim_time_s == pytest.approx(0.1)
    assert engine.published.energy_j == pytest.approx(5.0) and engine.published.power_w == pytest.approx(50.0)
    engine.submit("a", 50, 1)  # prefill [0.1, 0.15] at 500 W, one step [0.15, 0.16] at 100 W
    clock.set(0.199)
    engine.sync()
    assert engine.published.energy_j == pytest.approx(5.0)  # not refreshed before 0.2
    clock.set(0.25)
    engine.sync()
    # at 0.2: 5 J idle + 25 J prefill + 1 J decode + 0.04 s idle (2 J) = 33 J; mean power 280 W
    assert engine.published.sim_time_s == pytest.approx(0.2)
    assert engine.published.energy_j == pytest.approx(33.0)
    assert engine.published.power_w == pytest.approx(280.0)
    clock.set(10.05)  # many periods of idle in one jump
    engine.sync()
    assert engine.published.sim_time_s == pytest.approx(10.0)
    assert engine.published.energy_j == pytest.approx(33.0 + 50.0 * 9.8)
    assert engine.published.power_w == pytest.approx(50.0)


def test_time_scale_multiplies_wall_time() -> None:
    clock = FakeClock()
    engine = Engine(toy_profile(), clock=clock, time_scale=100.0)
    clock.t += 0.5
    assert engine.sync() == pytest.approx(50.0)
    assert engine.idle_j == pytest.approx(2500.0)


@pytest.mark.parametrize(
    "module",
    ["scer_proxy.sim.engine", "scer_proxy.sim.profiles", "scer_proxy.sim.output", "scer_proxy.sim.wire"],
)
def test_simulator_core_imports_no_io(module: str) -> None:
    code = (
        f"import sys, {module}; "
        "bad = [m for m in ('aiohttp', 'httpx', 'asyncio', 'socket', 'sqlite3', 'requests') if m in sys.modules]; "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"{module} pulls in {out.stdout.strip()} {out.stderr[-500:]}"
