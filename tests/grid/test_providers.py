"""Live grid-intensity providers against real fake servers on loopback port 0, never the internet.

Each fake is an aiohttp application whose answer the test sets (a body, a status, a hang). Freshness
runs on a fake monotonic clock and the refresher's sleep is a step the test releases, so nothing
asserts on wall-clock timing.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from scer_proxy.carbon.grid import GridIntensity
from scer_proxy.config import CarbonConfig, ConfigError
from scer_proxy.grid.providers import (
    FALLBACK_FLAG,
    TOKEN_ENV,
    ElectricityMaps,
    GridIntensitySource,
    Provider,
    UkCarbonIntensity,
    build_grid_source,
    build_provider,
    configured_intensity,
)
from tests.servers import start_site

TOKEN = "em-secret-token-5f3a9c"  # a fake credential the tests look for in every output
UK_PERIOD = {"from": "2024-05-01T12:00Z", "to": "2024-05-01T12:30Z"}


def uk_body(actual: Any = 149, forecast: Any = 156) -> dict[str, Any]:
    """The shape of ``GET /intensity`` (one current half-hour)."""
    return {
        "data": [{**UK_PERIOD, "intensity": {"forecast": forecast, "actual": actual, "index": "moderate"}}]
    }


def em_body(value: Any = 322, **extra: Any) -> dict[str, Any]:
    """The shape of Electricity Maps ``GET /v3/carbon-intensity/latest?zone=DE``."""
    return {
        "zone": "DE",
        "carbonIntensity": value,
        "datetime": "2024-05-01T12:00:00.000Z",
        "updatedAt": "2024-05-01T12:41:08.123Z",
        "emissionFactorType": "lifecycle",
        "isEstimated": False,
        "temporalGranularity": "hourly",
        **extra,
    }


class Fake:
    """A fake provider server: every route answers ``body`` with ``status``, or hangs while ``hang``."""

    def __init__(self) -> None:
        self.status = 200
        self.body: bytes = b"{}"
        self.hang = False
        self.hits = 0
        self.requests: list[web.Request] = []
        self.entered = asyncio.Event()  # a hanging request has arrived
        self.release = asyncio.Event()  # lets hanging requests finish (set at teardown)
        self.finished = 0
        self.url = ""

    def answer(self, body: Any, status: int = 200) -> None:
        self.body = body if isinstance(body, bytes) else orjson.dumps(body)
        self.status = status
        self.hang = False

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        self.requests.append(request)
        if self.hang:
            self.entered.set()
            await self.release.wait()
        self.finished += 1
        return web.Response(status=self.status, body=self.body, content_type="application/json")


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    server = Fake()
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", server.handle)
    runner, server.url = await start_site(app)
    yield server
    server.release.set()
    await runner.cleanup()


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class StepSleep:
    """The refresher's sleep: records each requested duration and waits for the test to release it."""

    def __init__(self) -> None:
        self.calls: list[float] = []
        self._steps: asyncio.Queue[None] = asyncio.Queue()

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)
        await self._steps.get()

    def release(self) -> None:
        self._steps.put_nowait(None)


async def until(predicate: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Yield to the loop until ``predicate`` holds (a bound against hangs, not a timing assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while not predicate():
        assert loop.time() < deadline, "condition never became true"
        await asyncio.sleep(0.002)


TABLE = GridIntensity(233.4, "table:GBR", "2022")


def source_for(provider: Provider, clock: FakeClock | None = None, **kwargs: Any) -> GridIntensitySource:
    return GridIntensitySource(
        TABLE, provider, clock=clock or FakeClock(), wall_clock=lambda: 1.7e9, **kwargs
    )


async def fetch_once(provider: Provider) -> GridIntensity:
    async with aiohttp.ClientSession() as session:
        return await provider.fetch(session)


def carbon(provider: str, region: str = "GBR", **extra: Any) -> Any:
    """A ``CarbonConfig`` naming a live provider, whether or not this version's validation admits it yet."""
    config = CarbonConfig(region=region)
    object.__setattr__(config, "provider", provider)
    for key, value in extra.items():
        object.__setattr__(config, key, value)
    return config


# -- parsing: both providers, exact values and labels --------------------------------------------------


async def test_uk_national_uses_actual_when_present(fake: Fake) -> None:
    fake.answer(uk_body(actual=149, forecast=156))
    value = await fetch_once(UkCarbonIntensity(fake.url))
    assert value == GridIntensity(149.0, "uk-carbon-intensity:actual", "2024-05-01T12:00Z/2024-05-01T12:30Z")
    assert fake.requests[0].path == "/intensity"


async def test_uk_national_falls_back_to_forecast_while_actual_is_null(fake: Fake) -> None:
    fake.answer(uk_body(actual=None, forecast=156))
    value = await fetch_once(UkCarbonIntensity(fake.url))
    assert (value.intensity_g_per_kwh, value.source) == (156.0, "uk-carbon-intensity:forecast")


async def test_uk_regional_endpoint(fake: Fake) -> None:
    fake.answer(
        {
            "data": [
                {
                    "regionid": 13,
                    "dnoregion": "UKPN London",
                    "shortname": "London",
                    "data": [
                        {
                            **UK_PERIOD,
                            "intensity": {"forecast": 187, "index": "moderate"},
                            "generationmix": [{"fuel": "gas", "perc": 40.1}],
                        }
                    ],
                }
            ]
        }
    )
    value = await fetch_once(UkCarbonIntensity(fake.url, region_id=13))
    assert value == GridIntensity(
        187.0, "uk-carbon-intensity:region13:forecast", "2024-05-01T12:00Z/2024-05-01T12:30Z"
    )
    assert fake.requests[0].path == "/regional/regionid/13"


def test_uk_region_id_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"carbon.uk_region_id"):
        UkCarbonIntensity(region_id=18)


async def test_electricity_maps_sends_zone_and_token_and_parses(fake: Fake) -> None:
    fake.answer(em_body(322))
    value = await fetch_once(ElectricityMaps("DE", TOKEN, fake.url))
    assert value == GridIntensity(322.0, "electricity-maps:DE", "2024-05-01T12:00:00.000Z")
    request = fake.requests[0]
    assert request.path == "/v3/carbon-intensity/latest"
    assert request.query["zone"] == "DE"
    assert request.headers["auth-token"] == TOKEN


async def test_electricity_maps_labels_estimates(fake: Fake) -> None:
    fake.answer(em_body(41.5, isEstimated=True))
    value = await fetch_once(ElectricityMaps("DE", TOKEN, fake.url))
    assert (value.intensity_g_per_kwh, value.source) == (41.5, "electricity-maps:DE:estimated")


# -- configuration -------------------------------------------------------------------------------------


def test_missing_token_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        build_provider(carbon("electricity-maps", region="FRA"), environ={})
    message = str(err.value)
    assert TOKEN_ENV in message and message.startswith("carbon.provider") and "\n" not in message


def test_zone_defaults_from_region_where_obvious_else_required() -> None:
    provider = build_provider(carbon("electricity-maps", region="FRA"), environ={TOKEN_ENV: TOKEN})
    assert isinstance(provider, ElectricityMaps) and provider.zone == "FR"
    with pytest.raises(ConfigError, match=r"^carbon.zone: required"):
        build_provider(carbon("electricity-maps", region="USA"), environ={TOKEN_ENV: TOKEN})
    explicit = build_provider(
        carbon("electricity-maps", region="USA"), environ={TOKEN_ENV: TOKEN}, zone="US-CAL-CISO"
    )
    assert isinstance(explicit, ElectricityMaps) and explicit.zone == "US-CAL-CISO"
    with pytest.raises(ConfigError, match=r"^carbon.zone"):
        build_provider(carbon("electricity-maps"), environ={TOKEN_ENV: TOKEN}, zone="not a zone")


def test_build_grid_source_reads_suggested_keys_when_present() -> None:
    config = carbon(
        "uk-carbon-intensity",
        uk_region_id=13,
        provider_url="http://127.0.0.1:9",
        refresh_s=60.0,
        timeout_s=2.0,
        max_age_s=600.0,
    )
    source = build_grid_source(config, environ={})
    assert isinstance(source.provider, UkCarbonIntensity)
    assert (source.provider.base_url, source.provider.region_id) == ("http://127.0.0.1:9", 13)
    assert (source.refresh_s, source.timeout_s, source.max_age_s) == (60.0, 2.0, 600.0)
    assert source.current() == dataclasses.replace(configured_intensity(config), flags=(FALLBACK_FLAG,))


async def test_static_answers_the_table_unflagged_and_starts_nothing() -> None:
    source = build_grid_source(CarbonConfig(region="FRA"), environ={})
    source.start()
    assert source.current() == configured_intensity(CarbonConfig(region="FRA"))
    assert source.current().flags == ()
    assert source.describe() == {
        "provider": "static",
        "source": "table:FRA",
        "intensity_g_per_kwh": source.current().intensity_g_per_kwh,
        "as_of": source.current().as_of,
        "age_s": None,
        "healthy": True,
        "last_error": None,
        "fallback": False,
    }
    await source.close()


def test_grid_intensity_keeps_its_old_constructor_and_reports_age() -> None:
    old = GridIntensity(56.0, "static", "configured")
    assert (old.fetched_at, old.flags, old.age_s(1e9)) == (None, (), None)
    assert GridIntensity(100.0, "x", "y", fetched_at=1000.0).age_s(1042.5) == 42.5


# -- caching and refresh ------------------------------------------------------------------------------


async def test_one_fetch_serves_many_reads_and_describe_reports_age(fake: Fake) -> None:
    fake.answer(uk_body(actual=149))
    clock = FakeClock()
    source = source_for(UkCarbonIntensity(fake.url), clock)
    try:
        assert await source.refresh_once()
        values = {source.current() for _ in range(1000)}
        assert fake.hits == 1
        (value,) = values
        assert (value.intensity_g_per_kwh, value.source, value.fetched_at, value.flags) == (
            149.0,
            "uk-carbon-intensity:actual",
            1.7e9,
            (),
        )
        clock.now += 90.0
        assert source.describe() == {
            "provider": "uk-carbon-intensity",
            "source": "uk-carbon-intensity:actual",
            "intensity_g_per_kwh": 149.0,
            "as_of": "2024-05-01T12:00Z/2024-05-01T12:30Z",
            "age_s": 90.0,
            "healthy": True,
            "last_error": None,
            "fallback": False,
        }
    finally:
        await source.close()


async def test_refresher_fetches_at_start_then_every_refresh_s(fake: Fake) -> None:
    fake.answer(uk_body(actual=149))
    sleep = StepSleep()
    source = GridIntensitySource(
        TABLE, UkCarbonIntensity(fake.url), refresh_s=300.0, clock=FakeClock(), sleep=sleep
    )
    try:
        source.start()
        await until(lambda: len(sleep.calls) == 1)
        assert fake.hits == 1 and sleep.calls == [300.0]
        assert source.current().intensity_g_per_kwh == 149.0
        fake.answer(uk_body(actual=120))
        for _ in range(10):
            source.current()
        assert fake.hits == 1  # reads never fetch
        sleep.release()
        await until(lambda: len(sleep.calls) == 2)
        assert fake.hits == 2 and sleep.calls == [300.0, 300.0]
        assert source.current().intensity_g_per_kwh == 120.0
    finally:
        await source.close()


# -- faults: fallback, flagged ------------------------------------------------------------------------


def assert_fallback(source: GridIntensitySource, error: str) -> None:
    value = source.current()
    assert value == GridIntensity(
        TABLE.intensity_g_per_kwh, TABLE.source, TABLE.as_of, flags=(FALLBACK_FLAG,)
    )
    described = source.describe()
    assert described["fallback"] is True and described["healthy"] is False
    assert described["source"] == "table:GBR" and described["age_s"] is None
    assert source.last_error is not None and error in source.last_error


async def test_timeout_falls_back_flagged(fake: Fake) -> None:
    fake.answer(uk_body())
    fake.hang = True
    source = source_for(UkCarbonIntensity(fake.url), timeout_s=0.05)
    try:
        assert not await source.refresh_once()
        assert_fallback(source, "timeout after 0.05 s")
    finally:
        await source.close()


async def test_http_500_falls_back_flagged(fake: Fake) -> None:
    fake.answer({"error": "boom"}, status=500)
    source = source_for(UkCarbonIntensity(fake.url))
    try:
        assert not await source.refresh_once()
        assert_fallback(source, "HTTP 500")
    finally:
        await source.close()


async def test_malformed_json_falls_back_flagged(fake: Fake) -> None:
    fake.answer(b'{"data": [{"from": ')
    source = source_for(ElectricityMaps("DE", TOKEN, fake.url))
    try:
        assert not await source.refresh_once()
        assert_fallback(source, "malformed JSON")
    finally:
        await source.close()


async def test_connection_refused_falls_back_flagged() -> None:
    source = source_for(UkCarbonIntensity("http://127.0.0.1:9"))
    try:
        assert not await source.refresh_once()
        assert_fallback(source, "connection error")
    finally:
        await source.close()


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"data": []}, "data: expected a non-empty list"),
        ({"nothing": 1}, "missing field data"),
        ([1, 2], "missing field data"),
        ({"data": [{**UK_PERIOD}]}, "missing field data[0].intensity"),
        ({"data": [{**UK_PERIOD, "intensity": {"actual": None}}]}, "missing field intensity.forecast"),
        (uk_body(actual=-5), "implausible"),
        (uk_body(actual=None, forecast=1e6), "implausible"),
        (uk_body(actual="149"), "expected a number"),
        (uk_body(actual=True), "expected a number"),
        ({"data": [{"intensity": {"actual": 149}}]}, "missing field data[0].from"),
    ],
)
async def test_bad_uk_answers_fall_back(fake: Fake, body: Any, error: str) -> None:
    fake.answer(body)
    source = source_for(UkCarbonIntensity(fake.url))
    try:
        assert not await source.refresh_once()
        assert_fallback(source, error)
    finally:
        await source.close()


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"zone": "DE"}, "missing field carbonIntensity"),
        (em_body(None), "expected a number"),
        (em_body(-1), "implausible"),
        (em_body(1e5), "implausible"),
        (em_body(322, zone="FR"), "asked for 'DE'"),
        ({k: v for k, v in em_body().items() if k != "datetime"}, "missing field datetime"),
    ],
)
async def test_bad_electricity_maps_answers_fall_back(fake: Fake, body: Any, error: str) -> None:
    fake.answer(body)
    source = source_for(ElectricityMaps("DE", TOKEN, fake.url))
    try:
        assert not await source.refresh_once()
        assert_fallback(source, error)
    finally:
        await source.close()


async def test_last_good_value_is_kept_until_max_age_then_the_table(fake: Fake) -> None:
    fake.answer(uk_body(actual=149))
    clock = FakeClock()
    source = source_for(UkCarbonIntensity(fake.url), clock, max_age_s=7200.0)
    try:
        assert await source.refresh_once()
        fake.answer({"error": "down"}, status=503)
        clock.now += 3600.0
        assert not await source.refresh_once()
        live = source.current()  # an hour-old value is still better than the annual table
        assert (live.intensity_g_per_kwh, live.flags) == (149.0, ())
        described = source.describe()
        assert (described["fallback"], described["healthy"], described["age_s"]) == (False, False, 3600.0)
        assert described["last_error"] is not None and "HTTP 503" in described["last_error"]
        clock.now += 3600.5  # now older than max_age_s
        assert_fallback(source, "HTTP 503")
    finally:
        await source.close()


async def test_stale_value_falls_back_even_without_a_failed_fetch(fake: Fake) -> None:
    fake.answer(uk_body(actual=149))
    clock = FakeClock()
    source = source_for(UkCarbonIntensity(fake.url), clock, max_age_s=600.0)
    try:
        assert await source.refresh_once()
        clock.now += 601.0
        assert source.current().flags == (FALLBACK_FLAG,)
        assert source.describe()["fallback"] is True
    finally:
        await source.close()


async def test_recovery_after_a_failure(fake: Fake) -> None:
    fake.answer({"error": "boom"}, status=500)
    source = source_for(UkCarbonIntensity(fake.url))
    try:
        with capture_logs() as logs:
            assert not await source.refresh_once()
            fake.answer(uk_body(actual=101))
            assert await source.refresh_once()
        value = source.current()
        assert (value.intensity_g_per_kwh, value.flags) == (101.0, ())
        assert source.healthy and source.last_error is None and not source.describe()["fallback"]
        assert [entry["event"] for entry in logs] == ["grid_provider_error", "grid_provider_recovered"]
    finally:
        await source.close()


async def test_each_distinct_error_is_logged_once(fake: Fake) -> None:
    fake.answer({"error": "boom"}, status=500)
    source = source_for(UkCarbonIntensity(fake.url))
    try:
        with capture_logs() as logs:
            for _ in range(5):
                await source.refresh_once()
            fake.answer(b"not json")
            for _ in range(3):
                await source.refresh_once()
        errors = [entry["error"] for entry in logs if entry["event"] == "grid_provider_error"]
        assert len(errors) == 2 and "HTTP 500" in errors[0] and errors[1] == "malformed JSON"
        assert all(entry["log_level"] == "warning" for entry in logs)
        assert source.failures == 8 and source.fetches == 8
    finally:
        await source.close()


# -- never on the request path ------------------------------------------------------------------------


async def test_current_returns_at_once_while_the_first_fetch_hangs(fake: Fake) -> None:
    fake.answer(uk_body(actual=149))
    fake.hang = True
    source = source_for(UkCarbonIntensity(fake.url), timeout_s=60.0)
    try:
        source.start()  # returns without waiting for the network
        await asyncio.wait_for(fake.entered.wait(), 10.0)
        value = source.current()  # synchronous: no await, so it cannot wait on the fetch
        assert value.flags == (FALLBACK_FLAG,) and value.source == "table:GBR"
        assert fake.finished == 0  # the fetch is still pending when current() has answered
        assert source._task is not None and not source._task.done()
        assert source.describe()["healthy"] is False and source.describe()["last_error"] is None
        fake.release.set()
        await until(lambda: not source.fallback)
        assert source.current().intensity_g_per_kwh == 149.0
    finally:
        await source.close()


async def test_close_cancels_a_hanging_fetch(fake: Fake) -> None:
    fake.hang = True
    source = source_for(UkCarbonIntensity(fake.url), timeout_s=60.0)
    source.start()
    await asyncio.wait_for(fake.entered.wait(), 10.0)
    await source.close()
    assert source._task is None and source.current().flags == (FALLBACK_FLAG,)


# -- the token stays secret ---------------------------------------------------------------------------


async def test_token_never_in_describe_logs_repr_or_errors(fake: Fake) -> None:
    provider = ElectricityMaps("DE", TOKEN, fake.url)
    source = source_for(provider, timeout_s=0.05)
    seen: list[str] = [repr(provider)]
    try:
        with capture_logs() as logs:
            for answer, status in ((b"{}", 401), (b"{bad", 200), (orjson.dumps(em_body(-3)), 200)):
                fake.answer(answer, status)
                await source.refresh_once()
                seen += [repr(source.describe()), repr(source.last_error)]
            fake.hang = True
            await source.refresh_once()
            seen.append(repr(source.describe()))
            fake.hang = False
            fake.answer(em_body(322))
            await source.refresh_once()
            seen += [repr(source.describe()), repr(source.current())]
        assert len(logs) == 5  # four distinct errors and the recovery
        seen.append(repr(logs))
    finally:
        await source.close()
    assert all(TOKEN not in text for text in seen)
    assert fake.requests[0].headers["auth-token"] == TOKEN  # it was sent, only to the provider


def test_provider_protocol_is_met() -> None:
    providers: list[Provider] = [UkCarbonIntensity(), ElectricityMaps("DE", TOKEN)]
    assert [p.name for p in providers] == ["uk-carbon-intensity", "electricity-maps"]


def test_bad_timings_are_refused() -> None:
    with pytest.raises(ValueError, match="must be > 0"):
        GridIntensitySource(TABLE, UkCarbonIntensity(), refresh_s=0)


# -- wired into the proxy --------------------------------------------------------------------------------

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "rivers?"}]}


def _provider_app(body: bytes, status: int) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/intensity", answer)
    return app


def _uk_proxy(servers: Any, start_proxy: Any, fake_upstream: str, body: Any, status: int = 200) -> str:
    from tests.conftest import proxy_config

    provider_url = servers.start(lambda: _provider_app(orjson.dumps(body), status))
    config = proxy_config(
        fake_upstream,
        meter={"kind": "estimate"},
        carbon={"region": "GBR", "provider": "uk-carbon-intensity", "provider_url": provider_url},
    )
    url: str = start_proxy(config=config)
    return url


def test_proxy_applies_the_live_value_with_source_and_age(
    servers: Any, start_proxy: Any, fake_upstream: str
) -> None:
    import httpx

    proxy = _uk_proxy(servers, start_proxy, fake_upstream, uk_body(actual=149))
    loop_deadline = 200
    while httpx.get(f"{proxy}/scer/summary").json()["grid"]["fallback"]:
        loop_deadline -= 1
        assert loop_deadline > 0, "the first fetch never landed"
        servers.call(asyncio.sleep(0.02))
    resp = httpx.post(f"{proxy}/v1/chat/completions", json=CHAT)
    assert resp.status_code == 200 and resp.headers["x-scer-grid-intensity"] == "149"
    record = httpx.get(f"{proxy}/scer/requests/{resp.headers['x-scer-request-id']}").json()
    assert record["grid_source"] == "uk-carbon-intensity:actual" and record["grid_age_s"] is not None
    assert "grid_fallback" not in record["flags"]
    health = httpx.get(f"{proxy}/scer/health").json()
    assert health["grid"]["healthy"] is True and health["grid"]["provider"] == "uk-carbon-intensity"


def test_proxy_falls_back_to_the_table_flagged(servers: Any, start_proxy: Any, fake_upstream: str) -> None:
    import httpx

    proxy = _uk_proxy(servers, start_proxy, fake_upstream, {"error": "boom"}, status=500)
    resp = httpx.post(f"{proxy}/v1/chat/completions", json=CHAT)
    assert resp.status_code == 200
    record = httpx.get(f"{proxy}/scer/requests/{resp.headers['x-scer-request-id']}").json()
    assert record["grid_source"] == "table:GBR" and record["grid_age_s"] is None
    assert "grid_fallback" in record["flags"]
    assert (
        record["grid_intensity_g_per_kwh"]
        == configured_intensity(CarbonConfig(region="GBR")).intensity_g_per_kwh
    )


def test_create_app_refuses_electricity_maps_without_a_token() -> None:
    from scer_proxy.app import create_app
    from scer_proxy.config import load_config

    config = load_config(overrides={"carbon": {"region": "FRA", "provider": "electricity-maps"}})
    with pytest.raises(ConfigError, match=TOKEN_ENV):
        create_app(config, environ={})
