from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from scer_proxy.app import create_app
from scer_proxy.config import Config, UpstreamConfig, load_config
from tests.fake_upstream import create_fake_upstream
from tests.servers import ThreadedServers


@pytest.fixture
def servers() -> Iterator[ThreadedServers]:
    hosted = ThreadedServers()
    yield hosted
    hosted.close()


def proxy_config(upstream_url: str, **sections: dict[str, Any]) -> Config:
    config = load_config(
        overrides={
            "meter": {"kind": "simulated", "interval_ms": 20},
            "storage": {"path": ":memory:"},
            **sections,
        }
    )
    return dataclasses.replace(config, upstreams=(UpstreamConfig(name="up", url=upstream_url),))


@pytest.fixture
def fake_upstream(servers: ThreadedServers) -> str:
    return servers.start(create_fake_upstream)


@pytest.fixture
def start_proxy(servers: ThreadedServers) -> Callable[..., str]:
    """Start a proxy in front of ``upstream_url``; ``meters`` replaces the configured meter per upstream."""

    def _start(
        upstream_url: str | None = None,
        *,
        config: Config | None = None,
        meters: Any = None,
        **sections: dict[str, Any],
    ) -> str:
        cfg = config or proxy_config(upstream_url or "http://127.0.0.1:9", **sections)
        return servers.start(lambda: create_app(cfg, meters=meters), handler_cancellation=True)

    return _start
