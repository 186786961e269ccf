"""``scer-proxy bench``: the standard benchmark through a running proxy, written as a SCER submission.

The workload runs at a fixed concurrency with the official openai client: one excluded warm-up repeat,
then at least three measured repeats, back to back (see :func:`_saturated_run`). The figures and the
submission are computed by ``scer_proxy.scer.benchmark``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import httpx
import openai
from tqdm import tqdm

from scer_proxy.cli.errors import (
    FAILED,
    TIMEOUT_S,
    USAGE,
    CliError,
    command,
    http_status,
    one_line,
    proxy_at,
    request_failed,
)
from scer_proxy.cli.tables import fmt_number
from scer_proxy.scer.benchmark import BenchError, Workload, load_workload, repeat_figures, submission


@command("bench")
def bench_command(args: argparse.Namespace) -> int:
    from scer_proxy.logs import configure_logging

    configure_logging("warning", json=False)
    try:
        sub = asyncio.run(
            run_bench(
                args.target,
                args.model,
                workload_name=args.workload,
                concurrency=args.concurrency,
                requests=args.requests,
                repeats=args.repeats,
                task=args.task,
                params_b=args.params_b or 0.0,
                admin_token=getattr(args, "token", ""),
            )
        )
    except BenchError as exc:
        raise CliError(str(exc), USAGE if str(exc).startswith("--") else FAILED) from None
    out = Path(args.out or f"scer-submission-{re.sub(r'[^A-Za-z0-9._-]+', '_', args.model)}.json")
    out.write_text(json.dumps(sub, indent=1) + "\n", encoding="utf-8")
    result = sub["result"]
    print(
        f"{sub['model']}  {sub['category']['task']} / {sub['category']['size_class']} / "
        f"{sub['hardware']['gpu_count']} x {sub['hardware']['gpu_model']}"
    )
    print(
        f"  {fmt_number(result['j_per_1k_output_tokens'])} J ({fmt_number(result['wh_per_1k_output_tokens'])} Wh) "
        f"per 1,000 output tokens, spread {100 * (result['spread_rel'] or 0):.1f} % over "
        f"{sub['workload']['repeats']} repeats; SCI {fmt_number(result['sci_g_per_1k_output_tokens'])} "
        f"gCO2eq per 1,000 output tokens ({result['energy_source']})"
    )
    print(f"  submission written to {out}")
    if not args.no_submit:
        target = args.target.rstrip("/")
        try:
            token = getattr(args, "token", "")
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            resp = httpx.post(f"{target}/scer/submissions", json=sub, timeout=TIMEOUT_S, headers=headers)
        except httpx.HTTPError as exc:
            raise request_failed(exc, proxy_at(target), "--target") from None
        if resp.status_code != 201:
            raise http_status(resp, proxy_at(target))
        rated = resp.json()
        print(
            f"  grade {rated['grade']} among {rated['peers']} peers"
            + (f" (percentile {rated['percentile']:.1f})" if rated["percentile"] is not None else "")
        )
    return 0


async def _settled(
    http: httpx.AsyncClient, target: str, ids: list[str], timeout_s: float
) -> list[dict[str, Any]]:
    """The ledger records of ``ids`` once the meter has settled them all."""
    deadline = time.monotonic() + timeout_s
    records: dict[str, dict[str, Any]] = {}
    while True:
        for rid in ids:
            if rid in records:
                continue
            try:
                resp = await http.get(f"{target}/scer/requests/{rid}")
            except httpx.HTTPError as exc:
                raise request_failed(exc, proxy_at(target), "--target") from None
            if resp.status_code == 200 and resp.json().get("settled"):
                records[rid] = resp.json()
        if len(records) == len(ids):
            return [records[rid] for rid in ids]
        if time.monotonic() > deadline:
            raise CliError(
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
    admin_token: str = "",
) -> dict[str, Any]:
    """Run the benchmark through the proxy at ``target``; returns the submission. ``admin_token`` is sent
    on the proxy's own endpoints (``/scer/health``, ``/scer/requests``) when the proxy has one."""
    if repeats < 3:
        raise CliError("--repeats: the standard benchmark needs at least 3 measured repeats", USAGE)
    workload = load_workload(workload_name)
    concurrency = concurrency or workload.concurrency
    requests = requests or len(workload.prompts)
    target = target.rstrip("/")
    where = proxy_at(target)
    admin = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    async with httpx.AsyncClient(timeout=TIMEOUT_S, headers=admin) as http:
        try:
            models_resp = await http.get(
                f"{target}/v1/models", headers={"Authorization": f"Bearer {api_key}"}
            )
            health_resp = await http.get(f"{target}/scer/health")
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise request_failed(exc, where, "--target") from None
        if health_resp.status_code == 401:
            raise CliError(f"{where}: /scer/health needs the admin token (--token)", USAGE)
        try:
            health = health_resp.json()
            meter, carbon = health.get("meter", {}), health.get("carbon")
        except (ValueError, AttributeError):
            raise CliError(f"{where}: /scer/health did not answer JSON (is it a scer-proxy?)") from None
        listed = (models_resp.json().get("data") or []) if models_resp.is_success else []
        client = openai.AsyncOpenAI(base_url=f"{target}/v1", api_key=api_key, max_retries=0, timeout=600)
        try:
            blocks = await _saturated_run(
                client, workload, model, concurrency, requests, repeats + 1, progress, target
            )
        finally:
            await client.close()
        # Block 0 is the warm-up, excluded; the others are the measured repeats.
        figures = [
            repeat_figures(await _settled(http, target, ids, settle_timeout_s), wall_s)
            for ids, wall_s in blocks[1:]
        ]
    return submission(
        model=model,
        workload=workload,
        requests=requests,
        concurrency=concurrency,
        task=task,
        params_b=params_b,
        listed=listed,
        server_header=models_resp.headers.get("server"),
        meter=meter,
        figures=figures,
        carbon=carbon,
    )


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
            raise CliError(f"{proxy_at(target)} did not answer with X-SCER-Request-Id: is it a scer-proxy?")
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
                    raise CliError(f"the upstream failed a benchmark request: {one_line(str(exc))}") from None
                raise exc  # type: ignore[misc]
        finally:
            done_wait.cancel()
            for w in workers:
                w.cancel()
            await asyncio.gather(done_wait, *workers, return_exceptions=True)
    return [(ids[b], last_s[b] - first_s[b]) for b in range(blocks)]
