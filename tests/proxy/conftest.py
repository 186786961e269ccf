from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.proxy.raw_http import RawUpstream, Script


@pytest.fixture
def raw_upstream() -> Iterator[Callable[..., RawUpstream]]:
    """Start raw-socket upstreams (``tests/proxy/raw_http.py``) for a test; all closed at its end."""
    started: list[RawUpstream] = []

    def _start(script: Script, **kwargs: float) -> RawUpstream:
        upstream = RawUpstream(script, **kwargs)
        started.append(upstream)
        return upstream

    yield _start
    for upstream in started:
        upstream.close()
