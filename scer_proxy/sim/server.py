"""The simulated GPU inference server: an OpenAI-compatible aiohttp application over the engine.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed and
not), ``POST /tokenize`` (vLLM style), ``GET /metrics`` (DCGM-exporter style energy and power),
``GET /health``, and the simulator's own ``GET /sim/truth/{id}``, ``GET /sim/energy``,
``GET /sim/profile``, ``GET|POST /sim/faults``.

Everything is built in :func:`create_sim_app` (no globals); the engine's driver task lives in a
``cleanup_ctx``. A request whose client disconnects is cancelled in the engine: streams notice it on
the next write (one per engine step), non-streamed requests by polling the connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from scer_proxy.proxy.serving import preload_tokenizer
from scer_proxy.sim.driver import EngineDriver
from scer_proxy.sim.engine import Engine, SeqStatus, Sequence
from scer_proxy.sim.output import output_length, output_words, request_seed
from scer_proxy.sim.profiles import DEFAULT_PROFILE, Profile, get_profile
from scer_proxy.sim.wire import (
    ChunkMaker,
    GenerationRequest,
    WireError,
    completion_response,
    error_body,
    parse_generation_request,
    tokenize,
    usage,
)

logger = logging.getLogger("scer_proxy.sim")

TRUE_ENERGY_HEADER = "X-Sim-True-Energy-J"
DISCONNECT_POLL_S = 0.02
RETRY_AFTER_S = 1
FAULT_KEYS = ("status_429", "status_500", "drop", "drop_after_chunks")
_DONE = b"data: [DONE]\n\n"


class FaultPlan:
    """Counts of injected faults still to serve: the next n metered requests fail in that way."""

    def __init__(self) -> None:
        self.status_429 = 0
        self.status_500 = 0
        self.drop = 0
        self.drop_after_chunks = 0

    def update(self, values: Mapping[str, Any]) -> None:
        unknown = set(values) - set(FAULT_KEYS)
        if unknown:
            raise ValueError(
                f"unknown fault keys: {', '.join(sorted(unknown))}; valid: {', '.join(FAULT_KEYS)}"
            )
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"fault {key!r} must be a non-negative integer")
            setattr(self, key, value)

    def take(self) -> str | None:
        """The fault for the next metered request, if any (429 first, then 500, then drop)."""
        for key in ("status_429", "status_500", "drop"):
            if getattr(self, key) > 0:
                setattr(self, key, getattr(self, key) - 1)
                return key
        return None

    def as_dict(self) -> dict[str, int]:
        return {key: getattr(self, key) for key in FAULT_KEYS}


@dataclass(slots=True)
class SimState:
    profile: Profile
    engine: Engine
    driver: EngineDriver
    seed: int
    default_max_tokens: int
    usage_on_streams: bool
    faults: FaultPlan
    created: int = field(default_factory=lambda: int(time.time()))


SIM_STATE: web.AppKey[SimState] = web.AppKey("scer_sim_state", SimState)


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(data), status=status, content_type="application/json", headers=headers
    )


def _error(exc: WireError) -> web.Response:
    return _json(exc.body(), status=exc.status)


async def _read_json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise WireError(400, f"We could not parse the JSON body of your request: {exc}") from exc


def _disconnected(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _wait_for_progress(event: asyncio.Event, request: web.Request) -> None:
    """Wait until the engine reports progress; raise ``ConnectionResetError`` if the client left."""
    while True:
        if _disconnected(request):
            raise ConnectionResetError("client disconnected")
        try:
            await asyncio.wait_for(event.wait(), DISCONNECT_POLL_S)
        except TimeoutError:
            continue
        event.clear()
        return


def _drop(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()


async def _generate(request: web.Request, kind: str) -> web.StreamResponse:
    sim = request.app[SIM_STATE]
    try:
        body = await _read_json(request)
        fault = sim.faults.take()
        if fault == "status_429":
            return _json(
                error_body(
                    "Rate limit reached for requests (simulated). Please try again later.",
                    "requests",
                    None,
                    "rate_limit_exceeded",
                ),
                status=429,
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        if fault == "status_500":
            return _json(
                error_body(
                    "The server had an error while processing your request (simulated).", "server_error"
                ),
                status=500,
            )
        gen = parse_generation_request(
            kind,
            body,
            model_id=sim.profile.model_id,
            max_model_len=sim.profile.max_model_len,
            default_max_tokens=sim.default_max_tokens,
            usage_on_streams=sim.usage_on_streams,
        )
    except WireError as exc:
        return _error(exc)
    drop_after_chunks: int | None = None
    if fault == "drop":
        if not gen.stream or sim.faults.drop_after_chunks <= 0:
            _drop(request)
            return web.Response()  # never sent: the connection is closed
        drop_after_chunks = sim.faults.drop_after_chunks

    key = request_seed(sim.seed, kind, body)
    count, finish_reason = output_length(key, gen.max_tokens, gen.ignore_eos)
    words = output_words(key, count)
    seq_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    progress = asyncio.Event()
    seq = sim.engine.submit(seq_id, gen.prompt_tokens, count, progress.set)
    sim.driver.kick()
    try:
        if gen.stream:
            return await _stream(request, sim, gen, seq, words, finish_reason, progress, drop_after_chunks)
        try:
            while not seq.done:
                await _wait_for_progress(progress, request)
        except ConnectionError:
            _drop(request)
            return web.Response()  # the client is gone; nothing is sent
        data = completion_response(
            kind,
            id_=seq_id,
            created=int(time.time()),
            model=sim.profile.model_id,
            text="".join(words),
            finish_reason=finish_reason,
            usage_=usage(gen.prompt_tokens, seq.completion_tokens),
        )
        return _json(data, headers={TRUE_ENERGY_HEADER: f"{seq.energy_j:.9f}"})
    finally:
        if not seq.done:
            sim.engine.cancel(seq)


async def _stream(
    request: web.Request,
    sim: SimState,
    gen: GenerationRequest,
    seq: Sequence,
    words: list[str],
    finish_reason: str,
    progress: asyncio.Event,
    drop_after_chunks: int | None,
) -> web.StreamResponse:
    chunks = ChunkMaker(
        gen.kind,
        id_=seq.id,
        created=int(time.time()),
        model=sim.profile.model_id,
        include_usage=gen.include_usage,
    )
    response = web.StreamResponse(headers={"Cache-Control": "no-cache"})
    response.content_type = "text/event-stream"
    response.charset = "utf-8"
    await response.prepare(request)
    try:
        await _relay(request, response, chunks, gen, seq, words, finish_reason, progress, drop_after_chunks)
    except ConnectionError:
        # The client went away (or a drop fault fired): close the connection; aiohttp's own
        # attempt to finish the response then fails quietly as a premature disconnection.
        _drop(request)
    return response


async def _relay(
    request: web.Request,
    response: web.StreamResponse,
    chunks: ChunkMaker,
    gen: GenerationRequest,
    seq: Sequence,
    words: list[str],
    finish_reason: str,
    progress: asyncio.Event,
    drop_after_chunks: int | None,
) -> None:
    sent_tokens = 0
    sent_chunks = 0
    opened = False
    while True:
        events: list[dict[str, Any]] = []
        produced = seq.completion_tokens
        if produced > sent_tokens and not opened:
            role = chunks.role()
            if role is not None:
                events.append(role)
            opened = True
        events.extend(chunks.token(words[i]) for i in range(sent_tokens, produced))
        sent_tokens = produced
        finished = seq.status is SeqStatus.FINISHED
        if finished:
            events.append(chunks.finish(finish_reason))
            if gen.include_usage:
                events.append(chunks.usage(usage(gen.prompt_tokens, seq.completion_tokens)))
        if drop_after_chunks is not None and sent_chunks + len(events) >= drop_after_chunks:
            events = events[: drop_after_chunks - sent_chunks]
            if events:
                await response.write(b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events))
            _drop(request)
            raise ConnectionResetError("connection dropped mid-stream (simulated fault)")
        if events or finished:
            payload = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
            await response.write(payload + _DONE if finished else payload)
            sent_chunks += len(events)
        if finished:
            await response.write_eof()
            return
        if seq.status is SeqStatus.CANCELLED:
            raise ConnectionResetError("request cancelled")
        await _wait_for_progress(progress, request)


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completions")


async def _models(request: web.Request) -> web.Response:
    sim = request.app[SIM_STATE]
    model = {
        "id": sim.profile.model_id,
        "object": "model",
        "created": sim.created,
        "owned_by": "scer-sim",
        "root": sim.profile.model_id,
        "parent": None,
        "max_model_len": sim.profile.max_model_len,
    }
    return _json({"object": "list", "data": [model]})


async def _tokenize(request: web.Request) -> web.Response:
    sim = request.app[SIM_STATE]
    try:
        ids = tokenize(await _read_json(request), model_id=sim.profile.model_id)
    except WireError as exc:
        return _error(exc)
    return _json(
        {"count": len(ids), "max_model_len": sim.profile.max_model_len, "tokens": ids, "token_strs": None}
    )


def _gpu_uuid(sim: SimState, index: int) -> str:
    return f"GPU-sim-{uuid.uuid5(uuid.NAMESPACE_URL, f'scer-sim/{sim.profile.name}/{sim.seed}/{index}')}"


def render_metrics(sim: SimState) -> str:
    """DCGM-exporter style Prometheus text of the latest published reading, split evenly over the GPUs."""
    sim.engine.sync()
    reading = sim.engine.published
    gpus = sim.profile.num_gpus
    labels = [
        f'gpu="{i}",UUID="{_gpu_uuid(sim, i)}",device="nvidia{i}",'
        f'modelName="{sim.profile.gpu_product_name}",Hostname="scer-sim"'
        for i in range(gpus)
    ]
    energy_mj = int(reading.energy_j * 1000.0 / gpus)
    power_w = reading.power_w / gpus
    lines = [
        "# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).",
        "# TYPE DCGM_FI_DEV_POWER_USAGE gauge",
        *(f"DCGM_FI_DEV_POWER_USAGE{{{label}}} {power_w:.3f}" for label in labels),
        "# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy consumption since boot (in mJ).",
        "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter",
        *(f"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{{{label}}} {energy_mj}" for label in labels),
    ]
    return "\n".join(lines) + "\n"


async def _metrics(request: web.Request) -> web.Response:
    text = render_metrics(request.app[SIM_STATE])
    return web.Response(
        text=text, content_type="text/plain", charset="utf-8", headers={"X-Content-Type-Options": "nosniff"}
    )


async def _health(request: web.Request) -> web.Response:
    return web.Response()


async def _truth(request: web.Request) -> web.Response:
    sim = request.app[SIM_STATE]
    sim.engine.sync()
    seq = sim.engine.truth(request.match_info["id"])
    if seq is None:
        return _json(
            error_body("no such completion id", "invalid_request_error", "id", "not_found"), status=404
        )
    return _json(seq.truth())


async def _energy(request: web.Request) -> web.Response:
    engine = request.app[SIM_STATE].engine
    engine.sync()
    return _json(
        {
            "counter_j": engine.counter_j,
            "attributed_j": engine.attributed_j,
            "idle_j": engine.idle_j,
            "active": engine.active,
            "waiting": engine.waiting,
            "steps": engine.stats.steps,
            "sim_time_s": engine.sim_time_s,
            "power_w": engine.power_now_w,
        }
    )


async def _profile(request: web.Request) -> web.Response:
    return _json(request.app[SIM_STATE].profile.as_dict())


async def _faults(request: web.Request) -> web.Response:
    sim = request.app[SIM_STATE]
    if request.method == "POST":
        try:
            body = await _read_json(request)
            if not isinstance(body, dict):
                raise WireError(400, "the request body must be a JSON object")
            sim.faults.update(body)
        except WireError as exc:
            return _error(exc)
        except ValueError as exc:
            return _json(error_body(str(exc), "invalid_request_error"), status=400)
    return _json(sim.faults.as_dict())


def create_sim_app(
    profile: Profile | None = None,
    *,
    time_scale: float = 1.0,
    seed: int = 0,
    metrics_period_ms: float = 100.0,
    default_max_tokens: int = 256,
    usage_on_streams: bool = True,
    tokenize_endpoint: bool = True,
    clock: Callable[[], float] | None = None,
    faults: Mapping[str, int] | None = None,
) -> web.Application:
    """The simulator as an aiohttp application (``profile`` defaults to ``llama-3.1-8b-h100``)."""
    if default_max_tokens < 1:
        raise ValueError("default_max_tokens must be >= 1")
    profile = profile if profile is not None else get_profile(DEFAULT_PROFILE)
    engine = Engine(
        profile,
        clock=clock if clock is not None else time.monotonic,
        time_scale=time_scale,
        metrics_period_s=metrics_period_ms / 1000.0,
    )
    plan = FaultPlan()
    if faults:
        plan.update(faults)
    state = SimState(
        profile=profile,
        engine=engine,
        driver=EngineDriver(engine),
        seed=seed,
        default_max_tokens=default_max_tokens,
        usage_on_streams=usage_on_streams,
        faults=plan,
    )
    app = web.Application()
    app[SIM_STATE] = state

    async def run_driver(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(app[SIM_STATE].driver.run(), name="scer-sim-engine")
        yield
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    app.on_startup.append(preload_tokenizer)
    app.cleanup_ctx.append(run_driver)
    app.router.add_get("/v1/models", _models)
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    if tokenize_endpoint:
        app.router.add_post("/tokenize", _tokenize)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/health", _health)
    app.router.add_get("/sim/truth/{id}", _truth)
    app.router.add_get("/sim/energy", _energy)
    app.router.add_get("/sim/profile", _profile)
    app.router.add_get("/sim/faults", _faults)
    app.router.add_post("/sim/faults", _faults)
    return app


async def serve_simulator(
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    profile: Profile | None = None,
    on_ready: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> None:
    """Serve the simulator until cancelled; ``kwargs`` are those of :func:`create_sim_app`.

    Logs one structured startup line (JSON) on the ``scer_proxy.sim`` logger and calls
    ``on_ready(base_url)`` once listening (useful with ``port=0``).
    """
    app = create_sim_app(profile, **kwargs)
    state = app[SIM_STATE]
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = port
        sockets = getattr(site._server, "sockets", None)
        if sockets:
            bound_port = sockets[0].getsockname()[1]
        url_host = f"[{host}]" if ":" in host else host
        url = f"http://{url_host}:{bound_port}"
        logger.info(
            orjson.dumps(
                {
                    "event": "simulator.started",
                    "url": url,
                    "profile": state.profile.name,
                    "model": state.profile.model_id,
                    "gpus": f"{state.profile.num_gpus}x{state.profile.gpu_model}",
                    "time_scale": state.engine.time_scale,
                    "seed": state.seed,
                }
            ).decode()
        )
        if on_ready is not None:
            on_ready(url)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
