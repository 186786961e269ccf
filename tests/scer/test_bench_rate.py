"""``scer-proxy bench`` through the proxy against the simulator, and ``scer-proxy rate``."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import httpx
import pytest

from scer_proxy.attribution.timeline import Share, Timeline, TimelineConfig
from scer_proxy.cli import bench
from scer_proxy.cli.bench import _saturated_run, run_bench
from scer_proxy.scer.benchmark import BenchError, load_workload
from scer_proxy.scer.book import published_csv
from scer_proxy.scer.rating import Entry, published_entries, rate_submissions
from scer_proxy.sim import create_sim_app, get_profile
from scer_proxy.sim.engine import Engine
from scer_proxy.sim.output import output_length, request_seed
from scer_proxy.sim.profiles import Profile
from scer_proxy.sim.wire import parse_generation_request
from tests.servers import ThreadedServers

T = TypeVar("T")


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
    sim = servers.start(lambda: create_sim_app(_batch32(), time_scale=10.0), handler_cancellation=True)
    return sim, start_proxy(sim, meter={"kind": "simulated", "interval_ms": 10})


MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def _batch32() -> Profile:
    return dataclasses.replace(get_profile("llama-3.1-8b-h100"), max_num_seqs=32)


def _published_at_32() -> Entry:
    return next(
        p
        for p in published_entries(published_csv(), concurrency=32)
        if p.name == MODEL and p.category.gpu_model == "H100" and p.category.gpu_count == 1
    )


class _VirtualClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class _VirtualServer:
    """The simulator's engine on a virtual clock, behind the one client call the benchmark makes.

    It stands in for the openai client of ``_saturated_run``: a request is parsed and sized as the
    simulator's HTTP server does it, submitted to the engine, and answered once the engine finishes
    it; the proxy's timeline observes each request's start and end (non-streamed) and reads the
    DCGM-style counter every ``sample_s``, as the proxy does over HTTP. :meth:`run` advances the
    clock only while every client waits on the engine, so batch formation does not depend on how
    fast this machine is.
    """

    def __init__(self, profile: Profile, *, sample_s: float = 0.025, metrics_period_s: float = 0.1) -> None:
        self.clock = _VirtualClock()
        self.profile = profile
        self.engine = Engine(profile, clock=self.clock, metrics_period_s=metrics_period_s)
        self.timeline = Timeline(TimelineConfig(idle="separate"))
        self.sample_s = sample_s
        self.settled: dict[str, Share] = {}
        self.chat = SimpleNamespace(completions=SimpleNamespace(with_raw_response=self))
        self._count = itertools.count()

    async def create(self, **kwargs: Any) -> SimpleNamespace:
        body = {k: v for k, v in kwargs.items() if k != "extra_body"} | kwargs.get("extra_body", {})
        gen = parse_generation_request(
            "chat",
            body,
            model_id=self.profile.model_id,
            max_model_len=self.profile.max_model_len,
            default_max_tokens=256,
            usage_on_streams=True,
        )
        count, _ = output_length(request_seed(0, "chat", body), gen.max_tokens, gen.ignore_eos)
        rid = f"r{next(self._count)}"
        done = asyncio.get_running_loop().create_future()

        def listener() -> None:
            if seq.done and not done.done():
                done.set_result(None)

        seq = self.engine.submit(rid, gen.prompt_tokens, count, listener)
        self.timeline.start(rid, self.clock.t, gen.prompt_tokens, stream=False)
        try:
            await done
        finally:  # a filler cancelled by the benchmark leaves the batch, as a client disconnect does
            if not seq.done:
                self.engine.cancel(seq)
            self.timeline.finish(rid, self.clock.t, seq.prompt_tokens, seq.completion_tokens)
        return SimpleNamespace(headers={"x-scer-request-id": rid})

    def _sample(self) -> None:
        result = self.timeline.reading(self.clock.t, self.engine.published.energy_j)
        for share in result.settled if result is not None else ():
            self.settled[share.rid] = share

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        task = asyncio.ensure_future(work)
        next_sample = 0.0137  # the proxy's reads are not in step with the counter's updates
        while not task.done():
            for _ in range(8):  # every woken client sends its next request before time moves on
                await asyncio.sleep(0)
            if task.done():
                break
            phase_end = self.engine.next_event_s()
            self.clock.t = max(
                self.clock.t, min(next_sample, phase_end if phase_end is not None else math.inf)
            )
            self.engine.sync()
            if self.clock.t >= next_sample:
                self._sample()
                next_sample += self.sample_s
        for _ in range(int(4 * self.engine.metrics_period_s / self.sample_s) + 2):  # settle the last
            self.clock.t = next_sample
            self.engine.sync()
            self._sample()
            next_sample += self.sample_s
        return task.result()


def test_bench_energy_matches_the_published_figure_at_that_batch() -> None:
    """The benchmark's saturated run (warm-up, repeats back to back, fillers) on the simulator at
    max_num_seqs = 32, on a virtual clock: every decode step runs the full batch, and the figure the
    proxy's attribution gives each repeat matches the ML.ENERGY row measured at that batch.

    Over HTTP on a loaded machine the clients cannot keep the simulator's batch full (it finishes steps
    faster than they resubmit), so the truth itself moves there; here batch formation is the protocol's.
    """
    server = _VirtualServer(_batch32())
    workload = load_workload("standard-chat-v1")
    # 40 in flight keep the 32 batch slots full, as the leaderboard's saturated queue does.
    run = _saturated_run(server, workload, MODEL, 40, 160, 4, False, "virtual")  # type: ignore[arg-type]
    blocks = asyncio.run(server.run(run))
    published = _published_at_32().j_per_1k_output_tokens
    # Every decode step of the run, warm-up and fillers included, ran at the full batch of 32.
    assert set(server.engine.stats.step_batches) == {32}, server.engine.stats.step_batches
    lengths = sum(p.get("max_tokens", 400) for p in workload.prompts[:160])
    figures, truths = [], []
    for ids, _wall_s in blocks[1:]:  # block 0 is the excluded warm-up
        assert len(ids) == 160 and all(rid in server.settled for rid in ids)  # every record settled
        tokens = sum(server.engine.truth(rid).completion_tokens for rid in ids)  # type: ignore[union-attr]
        assert tokens == lengths
        figures.append(1000 * sum(server.settled[rid].energy_j for rid in ids) / tokens)
        truths.append(1000 * sum(server.engine.truth(rid).energy_j for rid in ids) / tokens)  # type: ignore[union-attr]
    # The simulator's own energy at batch 32 is the published row's (its profile is built from it) ...
    assert all(abs(t / published - 1) <= 0.01 for t in truths), (truths, published)
    # ... and the benchmark's figure, what the proxy attributed to each repeat, matches it.
    mean = statistics.fmean(figures)
    assert all(abs(f / published - 1) <= 0.10 for f in figures), (figures, published)
    assert abs(mean / published - 1) <= 0.10 and statistics.pstdev(figures) / mean < 0.05, figures
    # Conservation on the virtual clock: what the proxy measured is attributed or idle, to the joule.
    attributed = sum(s.energy_j for s in server.settled.values())
    assert attributed + server.timeline.idle_j == pytest.approx(server.timeline.measured_j, rel=1e-9)


def test_bench_through_the_proxy_reports_its_settled_records(
    sim_proxy: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``run_bench`` over HTTP through the proxy, asserting only what load cannot move.

    Its J per 1,000 tokens is reported, not bounded here (the virtual-clock test above bounds it): on a
    busy machine the clients cannot keep the simulator's batch full, so the energy per token at the
    simulator itself moves. What holds on any machine: every repeat is the sum of its settled ledger
    records, every record settles, the tokens are the workload's, the proxy conserves the meter's energy,
    and the submission is labelled and rated as it says.
    """
    _sim, proxy = sim_proxy
    settled_blocks: list[list[dict[str, Any]]] = []
    settled = bench._settled

    async def spy(
        http: httpx.AsyncClient, target: str, ids: list[str], timeout_s: float
    ) -> list[dict[str, Any]]:
        records = await settled(http, target, ids, timeout_s)
        settled_blocks.append(records)
        return records

    monkeypatch.setattr(bench, "_settled", spy)
    submission = asyncio.run(run_bench(proxy, MODEL, concurrency=40, requests=160, repeats=3, progress=False))
    assert len(submission["repeats"]) == 3 and submission["workload"]["warmup_repeats_excluded"] == 1
    assert len(settled_blocks) == 3
    lengths = [p.get("max_tokens", 400) for p in load_workload("standard-chat-v1").prompts[:160]]
    ledger = {r["request_id"]: r for r in httpx.get(f"{proxy}/scer/requests?limit=10000").json()["data"]}
    for repeat, records in zip(submission["repeats"], settled_blocks, strict=True):
        assert repeat["requests"] == 160 and repeat["output_tokens"] == sum(lengths)
        # Each repeat's energy is the sum of its own settled records, as the ledger holds them.
        assert all(ledger[r["request_id"]]["settled"] for r in records)
        assert sorted(r["completion_tokens"] for r in records) == sorted(lengths)
        gpu_j = sum(ledger[r["request_id"]]["energy_gpu_j"] for r in records)
        assert gpu_j > 0 and repeat["gpu_energy_j"] == pytest.approx(gpu_j, rel=1e-12)
        assert repeat["j_per_1k_output_tokens"] == pytest.approx(1000 * gpu_j / sum(lengths), rel=1e-12)
        assert repeat["energy_source"] == "simulated"  # the meter the proxy read, named in every record
        assert {ledger[r["request_id"]]["energy_source"] for r in records} == {"simulated"}
    assert submission["result"]["j_per_1k_output_tokens"] == pytest.approx(
        statistics.fmean(r["j_per_1k_output_tokens"] for r in submission["repeats"]), rel=1e-12
    )
    # Conservation, once every request has ended and every interval measured is split: all the energy
    # the proxy measured up to then is attributed to the records or idle, none lost, none invented.
    for _ in range(500):
        before = httpx.get(f"{proxy}/scer/health").json()
        meter = before["meter"]["upstreams"][0]
        if not (
            meter["pending_requests"] or meter["deferred_intervals"] or before["ledger"]["pending_settlement"]
        ):
            break
        time.sleep(0.02)
    summary = httpx.get(f"{proxy}/scer/summary").json()
    after = httpx.get(f"{proxy}/scer/health").json()["meter"]["upstreams"][0]["measured_j"]
    ledger = {r["request_id"]: r for r in httpx.get(f"{proxy}/scer/requests?limit=10000").json()["data"]}
    assert all(r["settled"] for r in ledger.values())
    attributed = sum(r["energy_gpu_j"] for r in ledger.values())
    assert summary["totals"]["energy_j"] == pytest.approx(attributed, rel=1e-9)  # PUE 1 here
    # Idle keeps accruing between the reads: the sum lies between the measured energy before and after.
    total = attributed + summary["idle_energy_j"]
    assert meter["measured_j"] * (1 - 1e-9) <= total <= after * (1 + 1e-9), (
        total,
        meter["measured_j"],
        after,
    )
    assert submission["hardware"]["gpu_model"] == "H100" and submission["hardware"]["gpu_count"] == 1
    assert submission["category"] == {
        "task": "chat",
        "size_class": "<=20B",
        "gpu_model": "H100",
        "gpu_count": 1,
    }
    assert submission["meter"]["kind"] == "simulated" and MODEL in submission["server"]["models"]
    # Registered with the proxy, the submission gives the model its grade in headers and the summary:
    # the grade its own figure earns among the published peers, whatever that figure is.
    rated = httpx.post(f"{proxy}/scer/submissions", json=submission).json()
    expected = next(r for r in rate_submissions([submission], published_csv()) if not r.entry.published)
    assert rated["grade"] == expected.grade and rated["peers"] == expected.peers >= 2
    resp = httpx.post(
        f"{proxy}/v1/chat/completions",
        json={"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]},
    )
    assert resp.headers["x-scer-rating"] == rated["grade"]
    summary = httpx.get(f"{proxy}/scer/summary").json()
    row = next(m for m in summary["models"] if m["model"] == MODEL)
    assert row["grade"] == rated["grade"] and row["category"] == "chat / <=20B / 1 x H100"
    print(f"bench over HTTP: {submission['result']['j_per_1k_output_tokens']:.1f} J per 1,000 output tokens")


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
    model = MODEL
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
        # The submission's label links to the proxy's manifest of that submission, not of live traffic.
        suffix = "?from=benchmark" if extra[0] == "--submission" else ""
        assert _decode_qr(written) == manifest_url + suffix
        assert yaml.safe_load(out.with_suffix(".yaml").read_text())["name"]


def test_model_size_from_the_servers_model_list() -> None:
    from scer_proxy.scer.benchmark import server_params_b

    listed = [{"id": "tiny", "meta": {"n_params": 7_241_732_096}}, {"id": "other"}]
    assert server_params_b(listed, "tiny") == pytest.approx(7.241732096)
    assert server_params_b(listed, "other") is None and server_params_b(listed, "absent") is None
