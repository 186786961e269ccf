"""``scer-proxy health``: ask a running proxy's ``/scer/health``, found from the same configuration that
``serve`` reads (file, then environment). The Docker image's HEALTHCHECK: the slim base has no curl, and
a mounted configuration may move the port.

Exit 0 when the proxy answers 200 (its ``status``, ``ok`` or ``degraded``, is printed: a degraded meter
or ledger is shown there, not a reason to restart the container), 1 when it does not answer.
"""

from __future__ import annotations

import argparse
import os

from scer_proxy.cli.errors import command, get, proxy_at
from scer_proxy.config import ServerConfig, load_config


def local_url(server: ServerConfig) -> str:
    """The base URL to reach a proxy listening on ``server.listen`` from the same host (a wildcard
    address is reached on loopback)."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(server.host, server.host)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{server.port}"


@command("health")
def health_command(args: argparse.Namespace) -> int:
    server = load_config(args.config, environ=os.environ).server
    url = (args.url or local_url(server)).rstrip("/")
    headers = {"Authorization": f"Bearer {server.admin_token}"} if server.admin_token else {}
    resp = get(f"{url}/scer/health", proxy_at(url), "--url", headers=headers)
    print(resp.json().get("status"))
    return 0
