"""Configuration: a TOML file, then ``SCER_<SECTION>_<KEY>`` environment variables, then flags.

Read once at start into frozen dataclasses and validated as they are built; nothing reads the
configuration at import time. Every mistake raises :class:`ConfigError` with one line that names the
key, which the CLI prints before exiting with status 2.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from scer_proxy.carbon.embodied import EMBODIED_PRESETS


class ConfigError(ValueError):
    """A bad configuration key, type or value; the message is one line naming the key."""


METER_KINDS = ("auto", "nvml", "dcgm", "rapl", "estimate", "simulated")
ESTIMATE_GPUS = ("H100", "B200")
IDLE_POLICIES = ("amortize", "separate")
CARBON_PROVIDERS = ("static", "uk-carbon-intensity", "electricity-maps")
LOG_LEVELS = ("debug", "info", "warning", "error")
ON_CORRUPT = ("refuse", "move-aside")
MAX_INT = 2**63 - 1  # integers are 64-bit, as in TOML


def parse_listen(value: str, key: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) into its parts."""
    match = re.fullmatch(r"\[?([^\[\]]*?)\]?:(\d{1,5})", value.strip())
    if not match or not match.group(1) or not 0 <= int(match.group(2)) <= 65535:
        raise ConfigError(f"{key}: expected HOST:PORT, got {value!r}")
    return match.group(1), int(match.group(2))


def _check_url(value: str, key: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: expected an http(s) URL, got {value!r}")
    return value.rstrip("/")


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:8080"
    max_body_bytes: int = 16_777_216
    max_response_bytes: int = 67_108_864
    max_usage_tokens: int = 10_000_000  # an upstream's usage count above this is not believed
    admin_token: str = ""
    log_level: str = "info"
    # Client connections: what one client may hold, and how long a SIGTERM's drain takes in all.
    header_timeout_s: float = 10.0  # a request head (line and headers) must arrive whole within this
    keepalive_timeout_s: float = 75.0  # an idle keep-alive connection is closed after this
    max_connections: int = 4096  # open client connections; a request on one beyond is answered 503
    shutdown_timeout_s: float = 25.0  # SIGTERM to exit: the drain of requests in flight and the flush
    public_labels: bool = True  # labels and manifests answer without the admin token (a printed QR works)

    def __post_init__(self) -> None:
        parse_listen(self.listen, "server.listen")
        if self.max_body_bytes <= 0:
            raise ConfigError(f"server.max_body_bytes: must be > 0, got {self.max_body_bytes}")
        if self.max_response_bytes <= 0:
            raise ConfigError(f"server.max_response_bytes: must be > 0, got {self.max_response_bytes}")
        if self.max_usage_tokens <= 0:
            raise ConfigError(f"server.max_usage_tokens: must be > 0, got {self.max_usage_tokens}")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(
                f"server.log_level: expected one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}"
            )
        for key in ("header_timeout_s", "keepalive_timeout_s", "max_connections", "shutdown_timeout_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"server.{key}: must be > 0, got {getattr(self, key)}")

    @property
    def host(self) -> str:
        return parse_listen(self.listen, "server.listen")[0]

    @property
    def port(self) -> int:
        return parse_listen(self.listen, "server.listen")[1]


@dataclass(frozen=True)
class UpstreamConfig:
    name: str = "local"
    url: str = "http://127.0.0.1:8000"
    models: tuple[str, ...] = ("*",)
    gpus: tuple[int | str, ...] = (0,)
    timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    max_connections: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", _check_url(self.url, f"upstreams.{self.name}.url"))
        if not self.name:
            raise ConfigError("upstreams.name: must not be empty")
        if not self.models:
            raise ConfigError(f"upstreams.{self.name}.models: needs at least one glob pattern")
        for key in ("timeout_s", "connect_timeout_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"upstreams.{self.name}.{key}: must be > 0, got {getattr(self, key)}")
        if self.max_connections <= 0:
            raise ConfigError(f"upstreams.{self.name}.max_connections: must be > 0")

    def serves(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)


@dataclass(frozen=True)
class MeterConfig:
    kind: str = "auto"
    interval_ms: float = 100.0
    dcgm_url: str = ""
    dcgm_hostname: str = ""  # the host whose lines to read on a page of several (the ``Hostname`` label)
    rapl_root: str = "/sys/class/powercap"
    rapl_dram: bool = False
    estimate_gpu: str = "H100"

    def __post_init__(self) -> None:
        if self.kind not in METER_KINDS:
            raise ConfigError(f"meter.kind: expected one of {', '.join(METER_KINDS)}, got {self.kind!r}")
        if self.estimate_gpu not in ESTIMATE_GPUS:
            raise ConfigError(
                f"meter.estimate_gpu: expected one of {', '.join(ESTIMATE_GPUS)}, got {self.estimate_gpu!r}"
            )
        if not 10 <= self.interval_ms <= 60_000:
            raise ConfigError(f"meter.interval_ms: must be between 10 and 60000, got {self.interval_ms}")
        if self.dcgm_url:
            object.__setattr__(self, "dcgm_url", _check_url(self.dcgm_url, "meter.dcgm_url"))
        if self.dcgm_hostname != self.dcgm_hostname.strip() or '"' in self.dcgm_hostname:
            raise ConfigError(f"meter.dcgm_hostname: not a Hostname label value: {self.dcgm_hostname!r}")
        if self.kind == "dcgm" and not self.dcgm_url:
            raise ConfigError("meter.dcgm_url: required when meter.kind is 'dcgm'")


@dataclass(frozen=True)
class AttributionConfig:
    prefill_weight: float | str = "auto"
    idle: str = "amortize"
    idle_window_s: float = 3600.0  # ``amortize``: idle energy is spread over this window's requests

    def __post_init__(self) -> None:
        weight = self.prefill_weight
        if isinstance(weight, str):
            if weight != "auto":
                try:
                    object.__setattr__(self, "prefill_weight", float(weight))
                except ValueError:
                    raise ConfigError(
                        f"attribution.prefill_weight: expected a number or 'auto', got {weight!r}"
                    ) from None
        if not isinstance(self.prefill_weight, str) and self.prefill_weight < 0:
            raise ConfigError(f"attribution.prefill_weight: must be >= 0, got {self.prefill_weight}")
        if self.idle not in IDLE_POLICIES:
            raise ConfigError(
                f"attribution.idle: expected one of {', '.join(IDLE_POLICIES)}, got {self.idle!r}"
            )
        window = self.idle_window_s
        if isinstance(window, bool) or not isinstance(window, int | float):
            raise ConfigError(f"attribution.idle_window_s: expected a number, got {window!r}")
        if not (math.isfinite(window) and window > 0):
            raise ConfigError(f"attribution.idle_window_s: must be > 0 and finite, got {window}")


@dataclass(frozen=True)
class CarbonConfig:
    region: str = "USA"
    intensity_g_per_kwh: float = 0.0
    provider: str = "static"
    pue: float = 1.0
    zone: str = ""  # Electricity Maps zone; empty = derived from region where it is one zone
    uk_region_id: int = 0  # UK Carbon Intensity region 1-17; 0 = national (Great Britain)
    provider_url: str = ""  # the provider's base URL; empty = its public API
    refresh_s: float = 300.0  # seconds between live fetches
    timeout_s: float = 5.0  # seconds one live fetch may take
    max_age_s: float = 7200.0  # seconds a live value is used after its fetch; then the table

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z]{3}", self.region):
            raise ConfigError(f"carbon.region: expected an ISO 3166-1 alpha-3 code, got {self.region!r}")
        object.__setattr__(self, "region", self.region.upper())
        if self.intensity_g_per_kwh < 0:
            raise ConfigError(f"carbon.intensity_g_per_kwh: must be >= 0, got {self.intensity_g_per_kwh}")
        if self.provider not in CARBON_PROVIDERS:
            raise ConfigError(
                f"carbon.provider: expected one of {', '.join(CARBON_PROVIDERS)}, got {self.provider!r}"
            )
        if self.provider == "uk-carbon-intensity" and self.region != "GBR":
            raise ConfigError(
                f"carbon.region: must be 'GBR' with provider 'uk-carbon-intensity' (the table "
                f"figure it falls back to), got {self.region!r}"
            )
        if self.zone and not re.fullmatch(r"[A-Z]{2}(-[A-Za-z0-9-]{1,32})?", self.zone):
            raise ConfigError(
                f"carbon.zone: expected an Electricity Maps zone such as 'DE' or 'US-CAL-CISO', "
                f"got {self.zone!r}"
            )
        if not 0 <= self.uk_region_id <= 17:
            raise ConfigError(
                f"carbon.uk_region_id: expected 1 to 17 (0 = national), got {self.uk_region_id}"
            )
        if self.provider_url:
            object.__setattr__(self, "provider_url", _check_url(self.provider_url, "carbon.provider_url"))
        if not 0 < self.timeout_s <= 60:
            raise ConfigError(f"carbon.timeout_s: must be > 0 and at most 60, got {self.timeout_s}")
        if self.refresh_s < self.timeout_s:
            raise ConfigError(
                f"carbon.refresh_s: must be >= carbon.timeout_s ({self.timeout_s}), got {self.refresh_s}"
            )
        if self.max_age_s < self.refresh_s:
            raise ConfigError(
                f"carbon.max_age_s: must be >= carbon.refresh_s ({self.refresh_s}), got {self.max_age_s}"
            )
        if not 1.0 <= self.pue <= 5.0:
            raise ConfigError(f"carbon.pue: must be between 1.0 and 5.0, got {self.pue}")


@dataclass(frozen=True)
class EmbodiedConfig:
    preset: str = ""  # one of EMBODIED_PRESETS: its values are the defaults of the keys below
    gpu_kg: float = 164.0
    server_kg: float = 2500.0
    gpus_per_server: int = 8
    lifetime_years: float = 4.0

    def __post_init__(self) -> None:
        if self.preset and self.preset not in EMBODIED_PRESETS:
            raise ConfigError(
                f"embodied.preset: expected one of {', '.join(EMBODIED_PRESETS)}, got {self.preset!r}"
            )
        for key in ("gpu_kg", "server_kg"):
            if getattr(self, key) < 0:
                raise ConfigError(f"embodied.{key}: must be >= 0, got {getattr(self, key)}")
        if self.gpus_per_server <= 0:
            raise ConfigError(f"embodied.gpus_per_server: must be > 0, got {self.gpus_per_server}")
        if self.lifetime_years <= 0:
            raise ConfigError(f"embodied.lifetime_years: must be > 0, got {self.lifetime_years}")


@dataclass(frozen=True)
class RatingConfig:
    category_task: str = "chat"
    model_params_b: float = 0.0

    def __post_init__(self) -> None:
        if self.model_params_b < 0:
            raise ConfigError(f"rating.model_params_b: must be >= 0, got {self.model_params_b}")


@dataclass(frozen=True)
class MetricsConfig:
    max_models: int = 100  # models not listed in the configuration with their own label in /metrics

    def __post_init__(self) -> None:
        if not 0 <= self.max_models <= 100_000:
            raise ConfigError(f"metrics.max_models: must be between 0 and 100000, got {self.max_models}")


@dataclass(frozen=True)
class StorageConfig:
    path: str = "scer.db"
    retention_days: float = 90.0
    memory_records: int = 100_000  # records held in memory while the database cannot be written
    flush_interval_ms: float = 200.0  # ledger writes are batched this often; kill -9 loses at most one
    max_pending: int = 10_000  # records waiting for their settled figure; beyond, the oldest is settled as is
    on_corrupt: str = "refuse"  # a database that is not one at start: refuse to start, or move it aside

    def __post_init__(self) -> None:
        if self.on_corrupt not in ON_CORRUPT:
            raise ConfigError(
                f"storage.on_corrupt: expected one of {', '.join(ON_CORRUPT)}, got {self.on_corrupt!r}"
            )
        if self.max_pending <= 0:
            raise ConfigError(f"storage.max_pending: must be > 0, got {self.max_pending}")
        if self.retention_days <= 0:
            raise ConfigError(f"storage.retention_days: must be > 0, got {self.retention_days}")
        if self.flush_interval_ms <= 0:
            raise ConfigError(f"storage.flush_interval_ms: must be > 0, got {self.flush_interval_ms}")
        if self.memory_records <= 0:
            raise ConfigError(f"storage.memory_records: must be > 0, got {self.memory_records}")


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    upstreams: tuple[UpstreamConfig, ...] = field(default_factory=lambda: (UpstreamConfig(),))
    meter: MeterConfig = field(default_factory=MeterConfig)
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    carbon: CarbonConfig = field(default_factory=CarbonConfig)
    embodied: EmbodiedConfig = field(default_factory=EmbodiedConfig)
    rating: RatingConfig = field(default_factory=RatingConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __post_init__(self) -> None:
        names = [u.name for u in self.upstreams]
        if not names:
            raise ConfigError("upstreams: at least one [[upstreams]] entry is required")
        if len(set(names)) != len(names):
            raise ConfigError(f"upstreams.name: names must be unique, got {names}")

    def upstream_for(self, model: str) -> UpstreamConfig | None:
        """The first upstream whose glob patterns match ``model``."""
        return next((u for u in self.upstreams if u.serves(model)), None)

    @property
    def model_patterns(self) -> tuple[str, ...]:
        """Every upstream's model patterns, in order."""
        return tuple(p for u in self.upstreams for p in u.models)


SECTIONS: dict[str, type[Any]] = {
    "server": ServerConfig,
    "meter": MeterConfig,
    "attribution": AttributionConfig,
    "carbon": CarbonConfig,
    "embodied": EmbodiedConfig,
    "rating": RatingConfig,
    "storage": StorageConfig,
    "metrics": MetricsConfig,
}


class _NotFinite(ConfigError):
    """A number that is NaN or infinite: no option of a union may accept it as text instead."""


def _finite(number: float, value: Any, key: str) -> float:
    if not math.isfinite(number):
        raise _NotFinite(f"{key}: must be a finite number, got {value}")
    return number


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check (and for env strings, parse) one value against its field's type annotation.

    Every number is checked here, once for all keys: floats must be finite (``nan`` and ``inf`` pass
    every ``> 0`` check, so a key's own rule cannot catch them) and integers fit in 64 bits."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(annotation):
            try:
                return _coerce(value, option, key)
            except _NotFinite:
                raise
            except ConfigError as exc:
                errors.append(str(exc))
        names = " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(annotation))
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_type, key) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        number = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and re.fullmatch(r"[+-]?\d[\d_]*", value.strip()):
            digits = value.strip().replace("_", "")
            number = int(digits) if len(digits) <= 20 else MAX_INT + 1  # int() refuses 4,300 digits
        if number is None:
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if not -MAX_INT - 1 <= number <= MAX_INT:
            shown = (
                str(value) if len(str(value)) <= 24 else f"{str(value)[:20]}... ({len(str(value))} digits)"
            )
            raise ConfigError(f"{key}: must be a 64-bit integer, got {shown}")
        return number
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, int | float):
            return _finite(float(value), value, key)
        if isinstance(value, str):
            try:
                parsed = float(value.strip().replace("_", ""))
            except ValueError:
                pass
            else:
                return _finite(parsed, value, key)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type")  # pragma: no cover - a programming error


def _build(
    cls: type[Any], values: Mapping[str, Any], prefix: str, sources: Mapping[str, str] | None = None
) -> Any:
    """The section ``cls`` from ``values``; a bad value's error names its key and, from ``sources``
    (key -> where the value came from: the file, a variable, a flag), its source."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{prefix}.{key}: unknown key (known: {', '.join(sorted(known))})")
        source = (sources or {}).get(key)
        label = f"{prefix}.{key}" if source is None else f"{prefix}.{key} (from {source})"
        kwargs[key] = _coerce(value, hints[key], label)
    return cls(**kwargs)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """``SCER_<SECTION>_<KEY>`` variables as ``{section: {key: text}}``; unknown ones are errors."""
    out: dict[str, dict[str, str]] = {}
    for name, text in environ.items():
        if not name.startswith("SCER_"):
            continue
        rest = name[len("SCER_") :].lower()
        section = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
        if section is None:
            if rest.startswith("upstream_"):
                section = "upstream"
            else:
                raise ConfigError(
                    f"{name}: unknown configuration section (known: {', '.join(SECTIONS)}, upstream)"
                )
        out.setdefault(section, {})[rest[len(section) + 1 :]] = text
    return out


def load_config(
    path: str | Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    upstream_url: str | None = None,
    flags: Mapping[str, str] | None = None,
) -> Config:
    """Build the configuration: file, then environment, then ``overrides`` (from flags).

    ``SCER_UPSTREAM_URL`` in the environment, like ``upstream_url`` (the ``--upstream`` flag), replaces
    the ``[[upstreams]]`` list with one catch-all upstream. ``flags`` names the flag of an override
    (``{"server.listen": "--listen"}``) for error messages, which name where a bad value came from.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"--config: file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--config: cannot read {path}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
    for key in data:
        if key not in SECTIONS and key != "upstreams":
            raise ConfigError(f"{key}: unknown section (known: {', '.join([*SECTIONS, 'upstreams'])})")
    env = _env_overrides(environ or {})
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        raw = data.get(name, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{name}: expected a table [{name}]")
        flagged = (overrides or {}).get(name, {})
        merged: dict[str, Any] = {**raw, **env.get(name, {}), **flagged}
        sources = {key: str(path) for key in raw}
        sources.update({key: f"SCER_{name.upper()}_{key.upper()}" for key in env.get(name, {})})
        sources.update({key: (flags or {}).get(f"{name}.{key}", "the command line") for key in flagged})
        if name == "embodied" and merged.get("preset"):
            preset = EMBODIED_PRESETS.get(str(merged["preset"]).lower())
            if preset is None:
                raise ConfigError(
                    f"embodied.preset: expected one of {', '.join(EMBODIED_PRESETS)}, "
                    f"got {merged['preset']!r}"
                )
            merged = {**preset, **merged, "preset": str(merged["preset"]).lower()}
        sections[name] = _build(cls, merged, name, sources)

    raw_upstreams = data.get("upstreams", [])
    if not isinstance(raw_upstreams, list):
        raise ConfigError("upstreams: expected an array of tables [[upstreams]]")
    env_upstream = env.get("upstream", {})
    for key in env_upstream:
        if key != "url":
            raise ConfigError(f"SCER_UPSTREAM_{key.upper()}: unknown key (only SCER_UPSTREAM_URL is read)")
    catch_all = upstream_url or env_upstream.get("url")
    upstream_source = str(path)
    if catch_all:
        raw_upstreams = [{"name": "default", "url": catch_all}]
        upstream_source = "--upstream" if upstream_url else "SCER_UPSTREAM_URL"
    upstreams = []
    for index, item in enumerate(raw_upstreams):
        if not isinstance(item, dict):
            raise ConfigError(f"upstreams[{index}]: expected a table")
        sources = dict.fromkeys(item, upstream_source)
        upstreams.append(_build(UpstreamConfig, item, f"upstreams[{index}]", sources))
    if not upstreams:
        upstreams = [UpstreamConfig()]
    return Config(upstreams=tuple(upstreams), **sections)
