"""``scer-proxy demo``: the simulator and the proxy in one process, a mixed workload through the official
openai client, then the summary table. Needs no GPU and no network."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random

import httpx
import openai
from aiohttp import web
from tqdm import tqdm

from scer_proxy.cli.errors import command
from scer_proxy.cli.serve import run_on_uvloop, start_proxy
from scer_proxy.cli.tables import summary_table
from scer_proxy.config import UpstreamConfig, load_config, parse_listen
from scer_proxy.proxy.serving import serve_app, wait_for_signal
from scer_proxy.sim import create_sim_app, get_profile

TOPICS = ["rivers", "glaciers", "solar power", "city trees", "the water cycle", "wind farms", "soil", "tides"]


async def _start_simulator(time_scale: float) -> tuple[web.AppRunner, str, str]:
    profile = get_profile("llama-3.1-8b-h100")
    runner, url = await serve_app(create_sim_app(profile, time_scale=time_scale))
    return runner, url, profile.model_id


async def _one(client: openai.AsyncOpenAI, model: str, i: int, rng: random.Random) -> None:
    topic = TOPICS[i % len(TOPICS)]
    prompt = f"Write a few sentences about {topic}. " * rng.randint(1, 12)
    max_tokens = rng.choice([32, 64, 128, 256])
    shape = i % 4
    if shape == 0:
        await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens
        )
    elif shape == 1:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, stream=True
        )
        async for _chunk in stream:
            pass
    elif shape == 2:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for _chunk in stream:
            pass
    else:
        await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens)


async def _demo(args: argparse.Namespace) -> int:
    sim_runner, sim_url, model = await _start_simulator(args.time_scale)
    host, port = parse_listen(args.listen, "--listen")
    # The demo keeps its ledger in a temporary database, so each run starts from zero.
    config = load_config(
        overrides={"meter": {"kind": "simulated", "interval_ms": 50}, "storage": {"path": ":memory:"}}
    )
    config = dataclasses.replace(config, upstreams=(UpstreamConfig(name="simulator", url=sim_url),))
    proxy_runner, proxy_url = await start_proxy(config, host, port)
    try:
        print(f"simulator  {sim_url}  ({model}, 1 x H100, {args.time_scale:g}x real time)")
        print(f"proxy      {proxy_url}  (meter: simulated DCGM counter)\n")
        client = openai.AsyncOpenAI(base_url=f"{proxy_url}/v1", api_key="sk-demo", max_retries=0)
        rng = random.Random(7)
        gate = asyncio.Semaphore(args.concurrency)
        with tqdm(total=args.requests, desc="requests", unit="req") as bar:

            async def one(i: int) -> None:
                async with gate:
                    await _one(client, model, i, rng)
                bar.update(1)

            await asyncio.gather(*(one(i) for i in range(args.requests)))
        await client.close()
        await asyncio.sleep(0.3)  # one more meter reading settles the last requests
        async with httpx.AsyncClient() as http:
            summary = (await http.get(f"{proxy_url}/scer/summary")).json()
        print()
        print(summary_table(summary))
        grid = summary["grid"]
        print(
            f"\ngrid {grid['intensity_g_per_kwh']} gCO2e/kWh ({grid['source']}, {grid['as_of']}); "
            f"energy source: {summary['meter']['kind']}; idle energy not attributed: "
            f"{summary['idle_energy_j']:.3g} J"
        )
        print(f"\ndashboard  {proxy_url}/scer/")
        print(f"summary    {proxy_url}/scer/summary")
        print(f"requests   {proxy_url}/scer/requests?limit=10")
        if not args.once:
            print(
                "\nThe proxy and the simulator keep running; point an OpenAI client at "
                f"{proxy_url}/v1. Ctrl-C to stop."
            )
            await wait_for_signal()
        return 0
    finally:
        await proxy_runner.cleanup()
        await sim_runner.cleanup()


@command("demo")
def demo_command(args: argparse.Namespace) -> int:
    from scer_proxy.logs import configure_logging

    configure_logging("warning", json=False)
    return run_on_uvloop(_demo(args))
