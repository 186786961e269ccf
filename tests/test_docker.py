"""The Docker image's configuration order, tested without Docker: the Dockerfile is parsed (its ENV,
COPY, HEALTHCHECK, ENTRYPOINT and CMD), and its entry point is run with its arguments and environment,
with a "mounted" configuration in place of the shipped one. The image ships its defaults as a file
(``docker/config.toml`` at ``/etc/scer-proxy/config.toml``), never as ``SCER_*`` variables, which would
override a mounted file (they did: it asked for another port and file and got the image's).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from scer_proxy.config import load_config
from scer_proxy.proxy.serving import free_port
from tests.servers import ROOT, ThreadedServers, wait_ready

SHIPPED = "/etc/scer-proxy/config.toml"  # where the image's configuration is, and a mount goes


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions of the final stage as (KEYWORD, arguments), continuations joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    parsed = [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
        for line in (raw.strip() for raw in text.splitlines())
        if line and not line.startswith("#")
    ]
    last_from = max(i for i, (keyword, _) in enumerate(parsed) if keyword == "FROM")
    return parsed[last_from:]


def image_env() -> dict[str, str]:
    """What the image's ENV instructions set (both ``ENV K=V ...`` and ``ENV K V``)."""
    env: dict[str, str] = {}
    for keyword, args in instructions():
        if keyword != "ENV":
            continue
        words = shlex.split(args)
        if "=" not in words[0]:
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, value = word.split("=", 1)
            env[key] = value
    return env


def exec_form(keyword: str) -> list[str]:
    """The JSON (exec) form of an ENTRYPOINT or CMD, or of a HEALTHCHECK's CMD."""
    (args,) = [args for k, args in instructions() if k == keyword]
    if keyword == "HEALTHCHECK":
        args = args[args.index("CMD") + 3 :]
    command = json.loads(args)
    assert isinstance(command, list), f"{keyword} is in exec form"
    return command


def as_run_here(command: list[str], mounted: Path) -> list[str]:
    """The image's command as this checkout runs it: the console script is ``python -m scer_proxy``
    (the same ``main``), and the mounted file is where the image has the shipped one."""
    assert command[0] == "scer-proxy"
    return [sys.executable, "-m", "scer_proxy", *(str(mounted) if a == SHIPPED else a for a in command[1:])]


def environment() -> dict[str, str]:
    """This process's environment without its own SCER_* variables, plus the image's."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SCER_")}
    return {**base, **image_env(), "PYTHONPATH": str(ROOT)}


def test_the_dockerfile_sets_no_scer_variable_and_has_a_healthcheck() -> None:
    assert not [key for key in image_env() if key.startswith("SCER_")]
    copies = [args.split() for keyword, args in instructions() if keyword == "COPY"]
    assert ["docker/config.toml", SHIPPED] in copies, "the shipped configuration is the repo's file"
    entrypoint = exec_form("ENTRYPOINT")
    assert entrypoint[:2] == ["scer-proxy", "serve"] and entrypoint[2:] == ["--config", SHIPPED]
    assert exec_form("HEALTHCHECK")[:2] == ["scer-proxy", "health"]
    assert SHIPPED in exec_form("HEALTHCHECK"), "the healthcheck reads the configuration serve reads"


def test_dockerignore_keeps_the_environment_and_the_rest_out_of_the_context() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", "third_party", ".git", "**/__pycache__", ".pytest_cache", ".mypy_cache"} <= patterns
    assert "**/*.db" in patterns


def test_the_shipped_configuration_is_the_images_defaults() -> None:
    config = load_config(ROOT / "docker" / "config.toml", environ=image_env())
    assert config.server.listen == "0.0.0.0:8080"
    assert config.storage.path == "/var/lib/scer-proxy/scer.db"


def test_a_mounted_configuration_replaces_the_shipped_one(
    tmp_path: Path, servers: ThreadedServers, fake_upstream: str
) -> None:
    port, db = free_port(), tmp_path / "mounted.db"
    mounted = tmp_path / "config.toml"
    mounted.write_text(
        f'[server]\nlisten = "127.0.0.1:{port}"\n[meter]\nkind = "estimate"\n'
        f'[storage]\npath = "{db}"\n[[upstreams]]\nname = "up"\nurl = "{fake_upstream}"\n'
    )
    command = as_run_here(exec_form("ENTRYPOINT") + exec_form("CMD"), mounted)
    log = tmp_path / "proxy.log"
    with log.open("wb") as out:
        proxy = subprocess.Popen(
            command, cwd=tmp_path, env=environment(), stdout=out, stderr=subprocess.STDOUT
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/scer/health", proxy, log)  # the mounted file's port, not the image's 8080
        assert httpx.get(f"{url}/scer/health").json()["ledger"]["path"] == str(db)
        assert db.exists(), "the ledger is the mounted file's, not /var/lib/scer-proxy/scer.db"

        # The image's HEALTHCHECK, run the same way, finds the proxy from the same file.
        check = subprocess.run(
            as_run_here(exec_form("HEALTHCHECK"), mounted),
            env=environment(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (check.returncode, check.stdout.strip()) == (0, "ok"), check.stderr
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(30) == 0
    finally:
        if proxy.poll() is None:
            proxy.kill()
            proxy.wait(10)

    # And with the proxy gone, the healthcheck fails (exit 1, one line).
    check = subprocess.run(
        as_run_here(exec_form("HEALTHCHECK"), mounted),
        env=environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 1 and len(check.stderr.splitlines()) == 1, check.stderr
    assert check.stderr.startswith("scer-proxy health: the proxy at ")
