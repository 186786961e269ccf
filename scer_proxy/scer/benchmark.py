"""``scer-proxy bench``: the standard benchmark through a running proxy, written as a SCER submission.

The workload (``standard-chat-v1``, shipped in ``scer_proxy/workloads/``) runs at a fixed concurrency
through the proxy with the official openai client: one excluded warm-up repeat, then at least three
measured repeats. Each repeat's energy is the settled ledger records of its requests (GPU energy,
before PUE), so the figure is what the proxy measured request by request. The submission records the
workload id and hash, the hardware (GPU names from the meter), the server (``/v1/models`` and its
``Server`` header), the meter kind, each repeat's figures and their spread, and the SCI.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
import statistics
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import httpx
import openai
from tqdm import tqdm

from scer_proxy import __version__
from scer_proxy.attribution.energy_model import model_size_b
from scer_proxy.scer.rating import Category, gpu_family

SCER_VERSION = "SCER 0.1 (draft)"
SCI_VERSION = "SCI 1.1"


class BenchError(Exception):
    """The benchmark could not run (target unreachable, bad workload, records never settled)."""


@dataclass(frozen=True)
class Workload:
    id: str
    version: int
    sha256: str
    max_tokens: int
    ignore_eos: bool
    concurrency: int
    prompts: tuple[dict[str, Any], ...]


def load_workload(name: str) -> Workload:
    path = resources.files("scer_proxy") / "workloads" / f"{name}.json"
    if not path.is_file():
        available = sorted(
            p.name.removesuffix(".json")
            for p in (resources.files("scer_proxy") / "workloads").iterdir()
            if p.name.endswith(".json")
        )
        raise BenchError(f"--workload: unknown workload {name!r} (available: {', '.join(available)})")
    raw = path.read_bytes()
    data = json.loads(raw)
    return Workload(
        id=data["id"],
        version=int(data["version"]),
        sha256=hashlib.sha256(raw).hexdigest(),
        max_tokens=int(data["max_tokens"]),
        ignore_eos=bool(data["ignore_eos"]),
        concurrency=int(data["concurrency"]),
        prompts=tuple(data["prompts"]),
    )


def server_params_b(models: list[Any], model: str) -> float | None:
    """The model's size from the server's ``/v1/models`` metadata where it has it (llama.cpp reports
    ``meta.n_params``), in billions; None otherwise."""
    for entry in models:
        if isinstance(entry, dict) and entry.get("id") == model and isinstance(entry.get("meta"), dict):
            n_params = entry["meta"].get("n_params")
            if isinstance(n_params, int | float) and n_params > 0:
                return float(n_params) / 1e9
    return None


def _hardware(meter: dict[str, Any]) -> tuple[str, int, list[str]]:
    """GPU model family and count from the meter's device list (e.g. '0: NVIDIA H100 80GB HBM3')."""
    devices = [str(d) for d in meter.get("devices") or []]
    if not devices:
        return "unknown", 1, devices
    if meter.get("kind") == "estimate" and " x " in devices[0]:
        count, _, rest = devices[0].partition(" x ")
        return gpu_family(rest), int(count) if count.isdigit() else 1, devices
    return gpu_family(devices[0].split(":", 1)[-1]), len(devices), devices


async def _settled(
    http: httpx.AsyncClient, target: str, ids: list[str], timeout_s: float
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    records: dict[str, dict[str, Any]] = {}
    while True:
        for rid in ids:
            if rid in records:
                continue
            resp = await http.get(f"{target}/scer/requests/{rid}")
            if resp.status_code == 200 and resp.json().get("settled"):
                records[rid] = resp.json()
        if len(records) == len(ids):
            return [records[rid] for rid in ids]
        if time.monotonic() > deadline:
            raise BenchError(
                f"{len(ids) - len(records)} records did not settle within {timeout_s:.0f} s "
                "(is the proxy's meter reading?)"
            )
        await asyncio.sleep(0.05)


async def run_bench(
    target: str,
    model: str,
    *,
    workload_name: str = "standard-chat-v1",
    concurrency: int | None = None,
    requests: int | None = None,
    repeats: int = 3,
    task: str = "chat",
    params_b: float = 0.0,
    api_key: str = "sk-scer-bench",
    progress: bool = True,
    settle_timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Run the benchmark through the proxy at ``target``; returns the submission."""
    if repeats < 3:
        raise BenchError("--repeats: the standard benchmark needs at least 3 measured repeats")
    workload = load_workload(workload_name)
    concurrency = concurrency or workload.concurrency
    requests = requests or len(workload.prompts)
    target = target.rstrip("/")
    async with httpx.AsyncClient(timeout=30) as http:
        try:
            models_resp = await http.get(
                f"{target}/v1/models", headers={"Authorization": f"Bearer {api_key}"}
            )
            health = (await http.get(f"{target}/scer/health")).json()
        except httpx.HTTPError as exc:
            raise BenchError(f"--target: cannot reach {target}: {exc}") from None
        listed = (models_resp.json().get("data") or []) if models_resp.is_success else []
        server = {
            "models": [m.get("id") for m in listed if isinstance(m, dict)],
            "server_header": models_resp.headers.get("server"),
        }
        meter = health.get("meter", {})
        client = openai.AsyncOpenAI(base_url=f"{target}/v1", api_key=api_key, max_retries=0, timeout=600)
        try:
            blocks = await _saturated_run(
                client, workload, model, concurrency, requests, repeats + 1, progress, target
            )
        finally:
            await client.close()
        # Block 0 is the warm-up, excluded; the others are the measured repeats.
        figures = [
            _repeat_figures(await _settled(http, target, ids, settle_timeout_s), wall_s)
            for ids, wall_s in blocks[1:]
        ]
    gpu_model, gpu_count, devices = _hardware(meter)
    served_b = server_params_b(listed, model)
    if params_b <= 0 and served_b is not None:
        active_b, total_b, size_source = served_b, served_b, "server"
    else:
        active_b, total_b, size_source = model_size_b(model, params_b)
    category = Category.of(task, total_b, gpu_model, gpu_count)
    per_1k = [f["j_per_1k_output_tokens"] for f in figures]
    mean = statistics.fmean(per_1k)
    sci = statistics.fmean(f["sci_g_per_1k_output_tokens"] for f in figures)
    return {
        "scer_version": SCER_VERSION,
        "sci_version": SCI_VERSION,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tool": f"scer-proxy {__version__}",
        "model": model,
        "category": {
            "task": category.task,
            "size_class": category.size_class,
            "gpu_model": category.gpu_model,
            "gpu_count": category.gpu_count,
        },
        "model_params_b": {"activated": active_b, "total": total_b, "source": size_source},
        "workload": {
            "id": workload.id,
            "version": workload.version,
            "sha256": workload.sha256,
            "requests_per_repeat": requests,
            "concurrency": concurrency,
            "repeats": repeats,
            "warmup_repeats_excluded": 1,
            "max_tokens": workload.max_tokens,
            "ignore_eos": workload.ignore_eos,
            "steady_state": "repeats back to back, the queue kept full by excluded fillers",
        },
        "hardware": {"gpu_model": gpu_model, "gpu_count": gpu_count, "devices": devices},
        "server": server,
        "meter": {"kind": meter.get("kind"), "update_period_ms": meter.get("update_period_ms")},
        "repeats": figures,
        "result": {
            "j_per_1k_output_tokens": mean,
            "wh_per_1k_output_tokens": mean / 3600.0,
            "spread_rel": (statistics.pstdev(per_1k) / mean) if mean > 0 else None,
            "min_j_per_1k_output_tokens": min(per_1k),
            "max_j_per_1k_output_tokens": max(per_1k),
            "sci_g_per_1k_output_tokens": sci,
            "energy_source": figures[0]["energy_source"],
        },
    }


async def _saturated_run(
    client: openai.AsyncOpenAI,
    workload: Workload,
    model: str,
    concurrency: int,
    requests: int,
    blocks: int,
    progress: bool,
    target: str,
) -> list[tuple[list[str], float]]:
    """Run ``blocks`` consecutive blocks of ``requests`` requests with ``concurrency`` always in flight.

    ML.ENERGY measures in steady state, with the batch saturated. To match, the blocks follow one
    another with no drain between them, and once the last measured request has been sent, *filler*
    requests (the workload again, never measured) keep the queue full until the last measured one
    ends; then the fillers are cancelled, which frees the server at once. Every measured request thus
    runs in a full batch, as the published figure was measured. Returns each block's proxy request
    ids and its wall time (its first send to its last answer; neighbouring blocks overlap).
    """
    ids: list[list[str]] = [[] for _ in range(blocks)]
    first_s = [math.inf] * blocks
    last_s = [0.0] * blocks
    plan = iter([(block, i) for block in range(blocks) for i in range(requests)])
    fillers = itertools.count(requests)
    remaining = blocks * requests
    measured_done = asyncio.Event()

    async def send(i: int) -> str:
        prompt = workload.prompts[i % len(workload.prompts)]
        raw = await client.chat.completions.with_raw_response.create(
            model=model,
            messages=prompt["messages"],
            max_tokens=prompt.get("max_tokens", workload.max_tokens),
            temperature=0.0,
            extra_body={"ignore_eos": workload.ignore_eos},
        )
        rid = raw.headers.get("x-scer-request-id")
        if rid is None:
            raise BenchError(f"{target} did not answer with X-SCER-Request-Id: is it a scer-proxy?")
        return rid

    async def worker(bar: tqdm) -> None:
        nonlocal remaining
        while not measured_done.is_set():
            item = next(plan, None)
            if item is None:
                await send(next(fillers))  # keeps the batch full; cancelled once the measured ones end
                continue
            block, i = item
            first_s[block] = min(first_s[block], time.monotonic())
            ids[block].append(await send(i))
            last_s[block] = time.monotonic()
            bar.update(1)
            remaining -= 1
            if remaining == 0:
                measured_done.set()

    with tqdm(
        total=blocks * requests, desc="warm-up + repeats", unit="req", disable=not progress, leave=False
    ) as bar:
        workers = [asyncio.create_task(worker(bar)) for _ in range(concurrency)]
        done_wait = asyncio.create_task(measured_done.wait())
        try:
            await asyncio.wait([done_wait, *workers], return_when=asyncio.FIRST_COMPLETED)
            failed = [w for w in workers if w.done() and not w.cancelled() and w.exception() is not None]
            if failed:
                exc = failed[0].exception()
                if isinstance(exc, openai.APIError):
                    raise BenchError(f"the upstream failed a benchmark request: {exc}") from None
                raise exc  # type: ignore[misc]
        finally:
            done_wait.cancel()
            for w in workers:
                w.cancel()
            await asyncio.gather(done_wait, *workers, return_exceptions=True)
    return [(ids[b], last_s[b] - first_s[b]) for b in range(blocks)]


def _repeat_figures(records: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    output = sum(int(r["completion_tokens"]) for r in records)
    gpu_j = sum(float(r.get("energy_gpu_j") or 0.0) for r in records)

    def total(key: str) -> float:
        return sum(float(r.get(key) or 0.0) for r in records)

    carbon = sum(float(r.get("carbon_g") or 0.0) for r in records)
    sources = {r.get("energy_source") for r in records}
    if output <= 0:
        raise BenchError("the benchmark produced no output tokens")
    return {
        "requests": len(records),
        "prompt_tokens": sum(int(r["prompt_tokens"]) for r in records),
        "output_tokens": output,
        "gpu_energy_j": gpu_j,
        "energy_j": total("energy_j"),  # PUE included
        "carbon_operational_g": total("carbon_operational_g"),
        "carbon_embodied_g": total("carbon_embodied_g"),
        "hardware_s": total("hardware_s"),
        "started_at": min(float(r["started_at"]) for r in records),
        "ended_at": max(float(r.get("ended_at") or r["started_at"]) for r in records),
        "j_per_1k_output_tokens": gpu_j * 1000.0 / output,
        "carbon_g": carbon,
        "sci_g_per_1k_output_tokens": carbon * 1000.0 / output,
        "grid_intensity_g_per_kwh": records[0].get("grid_intensity_g_per_kwh"),
        "energy_source": ",".join(sorted(str(s) for s in sources)),
        "wall_s": wall_s,
        "output_tokens_per_s": output / wall_s if wall_s > 0 else None,
    }
