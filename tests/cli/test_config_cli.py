"""Configuration layering and validation; the command line's exit codes and one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from scer_proxy.cli.main import main
from scer_proxy.config import ConfigError, load_config
from tests.servers import ROOT


def test_defaults_match_the_contract() -> None:
    config = load_config()
    assert config.server.listen == "127.0.0.1:8080"
    assert config.server.max_body_bytes == 16_777_216
    assert config.upstreams[0].url == "http://127.0.0.1:8000"
    assert config.upstreams[0].models == ("*",)
    assert config.meter.kind == "auto" and config.meter.interval_ms == 100
    assert config.attribution.prefill_weight == "auto" and config.attribution.idle == "amortize"
    assert config.attribution.idle_window_s == 3600.0
    assert config.carbon.region == "USA" and config.carbon.pue == 1.0
    assert config.embodied.gpu_kg == 164.0 and config.embodied.lifetime_years == 4.0
    assert config.storage.path == "scer.db" and config.storage.retention_days == 90


def test_file_then_environment_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[server]\nlisten = "0.0.0.0:9000"\n[carbon]\nregion = "fra"\npue = 1.2\n'
        '[[upstreams]]\nname = "a"\nurl = "http://10.0.0.1:8000/"\nmodels = ["llama-*"]\ngpus = [0, "GPU-1"]\n'
        '[[upstreams]]\nname = "b"\nurl = "http://10.0.0.2:8000"\n'
    )
    env = {"SCER_CARBON_PUE": "1.4", "SCER_METER_INTERVAL_MS": "250", "HOME": "/x"}
    config = load_config(path, environ=env, overrides={"carbon": {"pue": 1.5}})
    assert config.server.port == 9000
    assert config.carbon.region == "FRA"
    assert config.carbon.pue == 1.5  # flags win over the environment
    assert config.meter.interval_ms == 250.0  # the environment wins over the file
    assert [u.name for u in config.upstreams] == ["a", "b"]
    assert config.upstreams[0].url == "http://10.0.0.1:8000"
    assert config.upstreams[0].gpus == (0, "GPU-1")
    assert config.upstream_for("llama-3").name == "a"  # type: ignore[union-attr]
    assert config.upstream_for("qwen").name == "b"  # type: ignore[union-attr]
    assert load_config(path, upstream_url="http://h:1").upstreams[0].url == "http://h:1"
    window = load_config(environ={"SCER_ATTRIBUTION_IDLE_WINDOW_S": "90"}).attribution.idle_window_s
    assert window == 90.0


@pytest.mark.parametrize(
    ("toml", "env", "needle"),
    [
        ("[server]\nlisten = 'nope'\n", {}, "server.listen"),
        ("[meter]\nkind = 'magic'\n", {}, "meter.kind"),
        ("[meter]\nkind = 'dcgm'\n", {}, "meter.dcgm_url"),
        ("[meter]\nintervals = 3\n", {}, "meter.intervals"),
        ("[carbon]\npue = 'high'\n", {}, "carbon.pue"),
        ("[carbon]\npue = 0.5\n", {}, "carbon.pue"),
        ("[attribution]\nprefill_weight = 'lots'\n", {}, "attribution.prefill_weight"),
        ("[attribution]\nidle_window_s = 0\n", {}, "attribution.idle_window_s"),
        ("[attribution]\nidle_window_s = -1\n", {}, "attribution.idle_window_s"),
        ("[attribution]\nidle_window_s = 'x'\n", {}, "attribution.idle_window_s"),
        ("[attribution]\nidle_window_s = inf\n", {}, "attribution.idle_window_s"),
        ("", {"SCER_ATTRIBUTION_IDLE_WINDOW_S": "nan"}, "attribution.idle_window_s"),
        ("[wat]\nx = 1\n", {}, "wat"),
        ("[[upstreams]]\nurl = 'ftp://x'\n", {}, "url"),
        ("[[upstreams]]\nname='a'\n[[upstreams]]\nname='a'\n", {}, "upstreams.name"),
        ("", {"SCER_METER_INTERVAL_MS": "fast"}, "meter.interval_ms"),
        ("", {"SCER_NOPE_X": "1"}, "SCER_NOPE_X"),
        ("[server\n", {}, "not valid TOML"),
    ],
)
def test_bad_configuration_names_the_key(tmp_path: Path, toml: str, env: dict[str, str], needle: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=env)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_cli_bad_config_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[carbon]\npue = 9\n")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "carbon.pue" in err
    assert main(["serve", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["serve", "--listen", "bad"]) == 2
    assert "server.listen" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["frobnicate"],
        ["serve", "--bogus"],
        ["simulate", "--profile", "no-such"],
        ["simulate", "--time-scale", "0"],
        ["demo", "--requests", "x"],
        [],
    ],
)
def test_cli_usage_errors_exit_2_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("scer-proxy")


def test_console_script_and_module_entry_points() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "scer_proxy", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("scer-proxy ")
    bad = subprocess.run(
        [sys.executable, "-m", "scer_proxy", "serve", "--meter", "nope"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "meter.kind" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    ("toml", "env", "overrides", "needle"),
    [
        ("[storage]\nflush_interval_ms = nan\n", {}, {}, "storage.flush_interval_ms (from {path})"),
        ("[[upstreams]]\nname = 'a'\ntimeout_s = nan\n", {}, {}, "upstreams[0].timeout_s (from {path})"),
        ("[carbon]\npue = inf\n", {}, {}, "carbon.pue (from {path})"),
        ("", {"SCER_STORAGE_FLUSH_INTERVAL_MS": "nan"}, {}, "(from SCER_STORAGE_FLUSH_INTERVAL_MS)"),
        ("", {"SCER_SERVER_SHUTDOWN_TIMEOUT_S": "inf"}, {}, "(from SCER_SERVER_SHUTDOWN_TIMEOUT_S)"),
        ("", {"SCER_METER_INTERVAL_MS": "-Infinity"}, {}, "meter.interval_ms"),
        ("", {"SCER_CARBON_PUE": "1e999"}, {}, "carbon.pue"),  # overflows to inf
        # A union with str must not take the text "nan" as a string once the number was refused.
        ("", {"SCER_ATTRIBUTION_PREFILL_WEIGHT": "nan"}, {}, "attribution.prefill_weight"),
        ("[attribution]\nprefill_weight = 'inf'\n", {}, {}, "attribution.prefill_weight"),
        ("", {}, {"storage": {"flush_interval_ms": float("nan")}}, "(from --flush-interval-ms)"),
        ("", {}, {"server": {"keepalive_timeout_s": float("inf")}}, "(from the command line)"),
    ],
)
def test_every_non_finite_number_is_refused_naming_its_key_and_source(
    tmp_path: Path, toml: str, env: dict[str, str], overrides: dict, needle: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_config(
            path, environ=env, overrides=overrides, flags={"storage.flush_interval_ms": "--flush-interval-ms"}
        )
    message = str(info.value)
    assert needle.format(path=path) in message
    assert "must be a finite number" in message and "\n" not in message


def test_integers_are_64_bit_and_a_huge_one_is_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={"SCER_SERVER_MAX_CONNECTIONS": "9" * 5000})  # int() itself refuses 4,300 digits
    message = str(info.value)
    assert message.startswith("server.max_connections (from SCER_SERVER_MAX_CONNECTIONS): must be a 64-bit")
    assert len(message) < 200
    assert load_config(environ={"SCER_SERVER_MAX_CONNECTIONS": "9_000"}).server.max_connections == 9000


def test_serve_with_a_nan_from_the_environment_exits_2_naming_the_variable(tmp_path: Path) -> None:
    env = {**os.environ, "SCER_STORAGE_FLUSH_INTERVAL_MS": "nan", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "scer_proxy", "serve", "--db", str(tmp_path / "x.db")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        "scer-proxy serve: storage.flush_interval_ms (from SCER_STORAGE_FLUSH_INTERVAL_MS): "
        "must be a finite number, got nan"
    )


def test_the_new_server_and_storage_keys_have_their_defaults_and_are_checked() -> None:
    server, storage = load_config().server, load_config().storage
    assert (server.header_timeout_s, server.keepalive_timeout_s) == (10.0, 75.0)
    assert (server.max_connections, server.shutdown_timeout_s) == (4096, 25.0)
    assert (storage.max_pending, storage.on_corrupt) == (10_000, "refuse")
    for section, key, value in [
        ("server", "header_timeout_s", 0),
        ("server", "max_connections", -1),
        ("server", "shutdown_timeout_s", 0),
        ("storage", "max_pending", 0),
        ("storage", "on_corrupt", "delete"),
    ]:
        with pytest.raises(ConfigError, match=rf"^{section}\.{key}"):
            load_config(overrides={section: {key: value}})
