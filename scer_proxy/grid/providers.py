"""Live grid carbon-intensity providers, fetched off the request path, cached, with fallback to the table.

Two providers, each one ``GET`` returning one figure in gCO2e/kWh:

- :class:`UkCarbonIntensity`: the Carbon Intensity API of National Grid ESO / NESO for Great Britain
  (https://api.carbonintensity.org.uk, no key; docs https://carbon-intensity.github.io/api-definitions/).
  National: ``GET /intensity`` answers ``{"data": [{"from": "2020-05-24T20:30Z", "to": "...",
  "intensity": {"forecast": 146, "actual": null, "index": "low"}}]}`` for the current half-hour;
  ``actual`` is ``null`` until the half-hour has closed. Regional: ``GET /regional/regionid/{1..17}``
  answers ``{"data": [{"regionid": 13, "shortname": "London", "data": [{"from", "to", "intensity":
  {"forecast", "index"}, "generationmix": [...]}]}]}`` (forecast only). Verified against published
  client code and examples (emoncms/demandshaper ``docs/forecasts/carbonintensity.md``, the CS50P
  regional example, the ``carbonintensity-api`` crate's region list 1-17). Note the API counts direct
  (operational) emissions of generation, whereas the bundled table (Ember) and Electricity Maps count
  lifecycle emissions, so UK figures read somewhat lower than the table's.
- :class:`ElectricityMaps`: ``GET https://api.electricitymap.org/v3/carbon-intensity/latest?zone=XX``
  with the header ``auth-token: <token>``, answering ``{"zone": "DE", "carbonIntensity": 322,
  "datetime": "2019-05-21T00:00:00.000Z", "updatedAt": "...", "emissionFactorType": "lifecycle",
  "isEstimated": false, "temporalGranularity": "hourly"}`` (Electricity Maps API v3; the shape as
  documented in published clients, e.g. blipee-dev's API notes and several ``auth-token`` examples).
  The token comes from the ``ELECTRICITYMAPS_TOKEN`` environment variable and is never logged, shown
  in ``repr`` or put in an error message.

:class:`GridIntensitySource` is what the application holds: ``current()`` is synchronous and O(1)
and never does I/O; a background task refreshes the cached value every ``refresh_s`` seconds with a
``timeout_s`` limit, and any failure (timeout, connection error, non-200 status, malformed JSON,
missing fields, negative or absurd values) leaves the proxy on the last good value while it is
younger than ``max_age_s``, then on the bundled table, flagged ``grid_fallback``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import aiohttp
import orjson
import structlog

from scer_proxy.carbon.grid import GridIntensity, annual_table
from scer_proxy.config import CarbonConfig, ConfigError

log = structlog.get_logger("scer_proxy.grid")

FALLBACK_FLAG = "grid_fallback"
TOKEN_ENV = "ELECTRICITYMAPS_TOKEN"
UK_BASE_URL = "https://api.carbonintensity.org.uk"
ELECTRICITY_MAPS_BASE_URL = "https://api.electricitymap.org"
DEFAULT_REFRESH_S = 300.0
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_AGE_S = 7200.0
# No grid averages above about 1,100 gCO2e/kWh (lignite and oil-shale systems); a figure above this
# is a unit mix-up or a broken feed, not a measurement.
MAX_PLAUSIBLE_G_PER_KWH = 2000.0
MAX_BODY_BYTES = 1 << 20
UK_REGION_IDS = range(1, 18)  # 1 North Scotland ... 13 London ... 15 England, 16 Scotland, 17 Wales

# ISO 3166-1 alpha-3 -> Electricity Maps zone, only where the country is a single zone (its mainland).
# Countries split into several zones (USA, CAN, AUS, ITA, SWE, NOR, DNK, JPN, IND, BRA, ...) need
# ``carbon.zone`` set explicitly.
REGION_TO_ZONE: dict[str, str] = {
    "AUT": "AT",
    "BEL": "BE",
    "BGR": "BG",
    "CHE": "CH",
    "CZE": "CZ",
    "DEU": "DE",
    "EST": "EE",
    "ESP": "ES",
    "FIN": "FI",
    "FRA": "FR",
    "GBR": "GB",
    "GRC": "GR",
    "HRV": "HR",
    "HUN": "HU",
    "IRL": "IE",
    "LTU": "LT",
    "LUX": "LU",
    "LVA": "LV",
    "NLD": "NL",
    "POL": "PL",
    "PRT": "PT",
    "ROU": "RO",
    "SVK": "SK",
    "SVN": "SI",
    "SRB": "RS",
    "SGP": "SG",
    "KOR": "KR",
    "TWN": "TW",
}
_ZONE = re.compile(r"^[A-Z]{2}(-[A-Za-z0-9-]{1,32})?$")


def configured_intensity(config: CarbonConfig) -> GridIntensity:
    """The intensity the configuration gives: an override, else the region's row of the table."""
    if config.intensity_g_per_kwh > 0:
        return GridIntensity(config.intensity_g_per_kwh, "static", "configured")
    row = annual_table().get(config.region)
    if row is None:
        raise ConfigError(
            f"carbon.region: {config.region!r} is not in the bundled table (ISO 3166-1 alpha-3)"
        )
    intensity, year, _name = row
    return GridIntensity(intensity, f"table:{config.region}", str(year))


class ProviderError(Exception):
    """A provider's answer could not be used; the message is short and never carries a credential."""


class Provider(Protocol):
    """A live grid-intensity source: one HTTP exchange gives one figure."""

    @property
    def name(self) -> str:
        """The provider's configuration name, e.g. ``"uk-carbon-intensity"``."""
        ...

    async def fetch(self, session: aiohttp.ClientSession) -> GridIntensity:
        """Fetch the current figure; raise :class:`ProviderError` (or a transport error) on failure."""
        ...


def plausible_intensity(value: Any, field: str) -> float:
    """``value`` as gCO2e/kWh when it is a finite number from 0 to ``MAX_PLAUSIBLE_G_PER_KWH``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProviderError(f"{field}: expected a number, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= MAX_PLAUSIBLE_G_PER_KWH:
        raise ProviderError(f"{field}: implausible intensity {number!r} gCO2e/kWh")
    return number


async def get_json(
    session: aiohttp.ClientSession,
    url: str,
    *,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Any:
    """``GET url`` and parse its JSON body (at most ``MAX_BODY_BYTES``); non-200 and bad JSON raise
    :class:`ProviderError`. Header values (credentials) never enter an error message."""
    async with session.get(url, params=params, headers=headers, allow_redirects=False) as resp:
        if resp.status != 200:
            raise ProviderError(f"HTTP {resp.status} from {resp.url.with_query(None)}")
        body = bytearray()
        async for chunk in resp.content.iter_chunked(65536):
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise ProviderError(f"response larger than {MAX_BODY_BYTES} bytes")
    try:
        return orjson.loads(bytes(body))
    except orjson.JSONDecodeError:
        raise ProviderError("malformed JSON") from None


def _field(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ProviderError(f"missing field {where}{key}")
    return obj[key]


def _first(obj: Any, key: str, where: str) -> Any:
    items = _field(obj, key, where)
    if not isinstance(items, list) or not items:
        raise ProviderError(f"{where}{key}: expected a non-empty list")
    return items[0]


class UkCarbonIntensity:
    """Great Britain's Carbon Intensity API (no key). National by default, or one of regions 1-17.

    Uses ``intensity.actual`` when present (the half-hour has closed), else ``intensity.forecast``;
    the source label says which (``uk-carbon-intensity:actual``, ``uk-carbon-intensity:forecast``,
    ``uk-carbon-intensity:region13:forecast``) and ``as_of`` is the period ``from/to`` (ISO 8601).
    """

    name = "uk-carbon-intensity"

    def __init__(self, base_url: str = UK_BASE_URL, *, region_id: int | None = None) -> None:
        if region_id is not None and region_id not in UK_REGION_IDS:
            raise ConfigError(f"carbon.uk_region_id: expected 1 to 17 (0 = national), got {region_id}")
        self.base_url = base_url.rstrip("/")
        self.region_id = region_id

    def __repr__(self) -> str:
        return f"UkCarbonIntensity(base_url={self.base_url!r}, region_id={self.region_id!r})"

    async def fetch(self, session: aiohttp.ClientSession) -> GridIntensity:
        if self.region_id is None:
            doc = await get_json(session, f"{self.base_url}/intensity")
            period = _first(doc, "data", "")
            label = self.name
        else:
            doc = await get_json(session, f"{self.base_url}/regional/regionid/{self.region_id}")
            region = _first(doc, "data", "")
            period = _first(region, "data", "data[0].")
            label = f"{self.name}:region{self.region_id}"
        intensity = _field(period, "intensity", "data[0].")
        actual = intensity.get("actual") if isinstance(intensity, dict) else None
        if actual is not None:
            value, kind = plausible_intensity(actual, "intensity.actual"), "actual"
        else:
            value = plausible_intensity(_field(intensity, "forecast", "intensity."), "intensity.forecast")
            kind = "forecast"
        start, end = _field(period, "from", "data[0]."), _field(period, "to", "data[0].")
        if not isinstance(start, str) or not isinstance(end, str):
            raise ProviderError("data[0].from/to: expected ISO 8601 strings")
        return GridIntensity(value, f"{label}:{kind}", f"{start}/{end}")


class ElectricityMaps:
    """Electricity Maps API v3 ``carbon-intensity/latest`` for one zone (lifecycle, location-based).

    The source label is ``electricity-maps:<zone>`` (``:estimated`` appended when the API says
    ``isEstimated``); ``as_of`` is the response's ``datetime`` (the hour the figure applies to).
    The token is sent as the ``auth-token`` header and kept out of ``repr`` and every message.
    """

    name = "electricity-maps"

    def __init__(self, zone: str, token: str, base_url: str = ELECTRICITY_MAPS_BASE_URL) -> None:
        if not _ZONE.match(zone):
            raise ConfigError(
                f"carbon.zone: expected an Electricity Maps zone such as 'DE' or 'US-CAL-CISO', got {zone!r}"
            )
        if not token.strip():
            raise ConfigError(
                f"carbon.provider: 'electricity-maps' needs an API token in the {TOKEN_ENV} "
                "environment variable"
            )
        self.zone = zone
        self._token = token.strip()
        self.base_url = base_url.rstrip("/")

    def __repr__(self) -> str:
        return f"ElectricityMaps(zone={self.zone!r}, base_url={self.base_url!r}, token=<hidden>)"

    async def fetch(self, session: aiohttp.ClientSession) -> GridIntensity:
        doc = await get_json(
            session,
            f"{self.base_url}/v3/carbon-intensity/latest",
            params={"zone": self.zone},
            headers={"auth-token": self._token},
        )
        value = plausible_intensity(_field(doc, "carbonIntensity", ""), "carbonIntensity")
        when = _field(doc, "datetime", "")
        if not isinstance(when, str):
            raise ProviderError("datetime: expected an ISO 8601 string")
        zone = doc.get("zone")
        if zone is not None and zone != self.zone:
            raise ProviderError(f"zone: asked for {self.zone!r}, got {zone!r}")
        label = f"{self.name}:{self.zone}" + (":estimated" if doc.get("isEstimated") is True else "")
        return GridIntensity(value, label, when)


def zone_for(config: CarbonConfig, zone: str = "") -> str:
    """The Electricity Maps zone: ``zone`` when given, else the one ``carbon.region`` maps to."""
    if zone:
        return zone
    mapped = REGION_TO_ZONE.get(config.region)
    if mapped is None:
        raise ConfigError(
            f"carbon.zone: required with provider 'electricity-maps' (region {config.region!r} "
            "has no single zone), e.g. 'US-CAL-CISO'"
        )
    return mapped


def build_provider(
    config: CarbonConfig,
    environ: Mapping[str, str],
    *,
    zone: str = "",
    uk_region_id: int = 0,
    base_url: str = "",
) -> Provider | None:
    """The provider ``carbon.provider`` names (``None`` for ``static``); raises :class:`ConfigError`.

    ``zone``, ``uk_region_id`` (0 = national) and ``base_url`` (empty = the public API) are the
    suggested ``carbon.zone``, ``carbon.uk_region_id`` and ``carbon.provider_url`` keys.
    """
    if config.provider == "static":
        return None
    if config.provider == "uk-carbon-intensity":
        return UkCarbonIntensity(base_url or UK_BASE_URL, region_id=uk_region_id or None)
    if config.provider == "electricity-maps":
        return ElectricityMaps(
            zone_for(config, zone), environ.get(TOKEN_ENV, ""), base_url or ELECTRICITY_MAPS_BASE_URL
        )
    raise ConfigError(f"carbon.provider: unknown provider {config.provider!r}")


class GridIntensitySource:
    """The grid intensity the proxy applies: a cached live value, else the table (flagged).

    ``current()`` is synchronous, O(1) and never waits on the network. With a provider, ``start()``
    launches a background task that fetches at once and then every ``refresh_s`` seconds, each fetch
    limited to ``timeout_s`` seconds; a good value is used while younger than ``max_age_s`` seconds
    (by ``clock``, monotonic), after which the table figure ``fallback`` returns, flagged
    ``grid_fallback``. Until the first success the table figure is used, flagged the same way.
    Without a provider (``static``) it always answers ``fallback`` unflagged and starts nothing.

    ``clock`` (monotonic seconds) decides freshness; ``wall_clock`` (Unix seconds) stamps
    ``fetched_at``; ``sleep`` waits between fetches; all three are injectable for tests.
    """

    def __init__(
        self,
        fallback: GridIntensity,
        provider: Provider | None = None,
        *,
        refresh_s: float = DEFAULT_REFRESH_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_age_s: float = DEFAULT_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if refresh_s <= 0 or timeout_s <= 0 or max_age_s <= 0:
            raise ValueError("refresh_s, timeout_s and max_age_s must be > 0")
        self.provider = provider
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self.max_age_s = max_age_s
        self._clock = clock
        self._wall = wall_clock
        self._sleep = sleep
        self._table = fallback
        self._flagged = GridIntensity(
            fallback.intensity_g_per_kwh, fallback.source, fallback.as_of, flags=(FALLBACK_FLAG,)
        )
        self._good: GridIntensity | None = None
        self._good_at = 0.0  # clock() when _good arrived
        self._last_ok: bool | None = None  # outcome of the last attempt; None before the first
        self.last_error: str | None = None
        self.fetches = 0
        self.failures = 0
        self._logged: set[str] = set()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    # -- the hot path -------------------------------------------------------------------------------
    def current(self) -> GridIntensity:
        """The figure to apply now: the live value while fresh, else the table (flagged when live)."""
        if self.provider is None:
            return self._table
        good = self._good
        if good is not None and self._clock() - self._good_at <= self.max_age_s:
            return good
        return self._flagged

    @property
    def fallback(self) -> bool:
        """True when a provider is configured but the table figure is being applied."""
        return self.current() is self._flagged

    @property
    def healthy(self) -> bool:
        """Static: always. Live: the last attempt succeeded and its value is being applied."""
        return self.provider is None or (self._last_ok is True and not self.fallback)

    # -- the refresher ------------------------------------------------------------------------------
    def start(self) -> None:
        """Launch the background refresher (no-op for ``static``); never waits for the first fetch."""
        if self.provider is None or self._task is not None:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout_s), connector=aiohttp.TCPConnector(limit=2)
        )
        self._task = asyncio.get_running_loop().create_task(self._run(), name="grid-intensity-refresh")

    async def close(self) -> None:
        """Stop the refresher and close its HTTP session."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _run(self) -> None:
        while True:
            await self.refresh_once()
            await self._sleep(self.refresh_s)

    async def refresh_once(self) -> bool:
        """One fetch with the timeout; returns whether it succeeded. Never raises (except cancellation)."""
        provider = self.provider
        if provider is None:
            return True
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s), connector=aiohttp.TCPConnector(limit=2)
            )
        self.fetches += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                value = await provider.fetch(self._session)
        except ProviderError as exc:
            error = str(exc)
        except TimeoutError:
            error = f"timeout after {self.timeout_s:g} s"
        except aiohttp.ClientError as exc:
            error = f"connection error: {type(exc).__name__}"
        except Exception as exc:  # a provider bug must not kill the refresher
            error = f"unexpected error: {type(exc).__name__}"
        else:
            self._good = GridIntensity(
                value.intensity_g_per_kwh, value.source, value.as_of, fetched_at=self._wall(), flags=()
            )
            self._good_at = self._clock()
            if self._last_ok is False:
                log.info(
                    "grid_provider_recovered",
                    provider=provider.name,
                    source=value.source,
                    intensity_g_per_kwh=value.intensity_g_per_kwh,
                )
            self._last_ok = True
            self.last_error = None
            self._logged.clear()  # a later failure is news again
            return True
        self._last_ok = False
        self.failures += 1
        self.last_error = error
        if error not in self._logged:  # each distinct error once per outage
            self._logged.add(error)
            using = self.current()
            log.warning(
                "grid_provider_error",
                provider=provider.name,
                error=error,
                using=using.source,
                intensity_g_per_kwh=using.intensity_g_per_kwh,
            )
        return False

    # -- reporting ----------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """For health and the summary: provider, the figure applied, its age in seconds and state."""
        value = self.current()
        fallback = value is self._flagged
        age_s = None if value.fetched_at is None else max(0.0, self._clock() - self._good_at)
        return {
            "provider": self.provider.name if self.provider is not None else "static",
            "source": value.source,
            "intensity_g_per_kwh": value.intensity_g_per_kwh,
            "as_of": value.as_of,
            "age_s": age_s,
            "healthy": self.healthy,
            "last_error": self.last_error,
            "fallback": fallback,
        }


def build_grid_source(
    config: CarbonConfig,
    environ: Mapping[str, str],
    *,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> GridIntensitySource:
    """The runtime source for ``config`` (no I/O; raises :class:`ConfigError` on a bad setting).

    Reads the suggested keys ``carbon.zone``, ``carbon.uk_region_id``, ``carbon.provider_url``,
    ``carbon.refresh_s``, ``carbon.timeout_s`` and ``carbon.max_age_s`` when the configuration has
    them, else uses their defaults ("", 0 = national, "" = the public API, 300 s, 5 s, 7200 s).
    The Electricity Maps token is read from ``environ[ELECTRICITYMAPS_TOKEN]``, never from the file.
    """
    provider = build_provider(
        config,
        environ,
        zone=str(getattr(config, "zone", "")),
        uk_region_id=int(getattr(config, "uk_region_id", 0)),
        base_url=str(getattr(config, "provider_url", "")),
    )
    return GridIntensitySource(
        configured_intensity(config),
        provider,
        refresh_s=float(getattr(config, "refresh_s", DEFAULT_REFRESH_S)),
        timeout_s=float(getattr(config, "timeout_s", DEFAULT_TIMEOUT_S)),
        max_age_s=float(getattr(config, "max_age_s", DEFAULT_MAX_AGE_S)),
        clock=clock,
        wall_clock=wall_clock,
    )
