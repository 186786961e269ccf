"""``/scer/label/{model}.svg`` and ``/scer/manifest/{model}.yaml`` over HTTP for models with names a
client may send: long ones (over YAML's 1,024-character key limit and any QR code's capacity), quotes,
colons, line breaks. Each answers 200 with an SVG that parses and a manifest that parses back."""

from __future__ import annotations

import dataclasses
import random
import xml.etree.ElementTree as ET
from urllib.parse import quote

import httpx
import pytest
import yaml
from aiohttp import web

from scer_proxy import app as app_module
from scer_proxy.web.keys import LEDGER
from tests.conftest import proxy_config
from tests.ledger.test_ledger import make_record
from tests.servers import ThreadedServers

MODELS = [
    "org/" + "long-model-name-" * 70,  # 1,124 characters
    "org/" + "x" * 2500,  # percent-encoded still under the request line's 8,190 bytes
    'say "hi": to: me',
    "two\nlines\r\nhere",
    "- ? # & * ! | > % @ `",
]


@pytest.fixture
def proxy(servers: ThreadedServers, fake_upstream: str) -> str:
    made: list[web.Application] = []

    def make() -> web.Application:
        made.append(app_module.create_app(proxy_config(fake_upstream)))
        return made[0]

    url = servers.start(make, handler_cancellation=True)
    rng = random.Random(5)
    records = []
    for i, model in enumerate(MODELS * 3):
        r = make_record(i, rng=rng)
        records.append(
            dataclasses.replace(
                r, model=model, status="ok", endpoint="chat.completions", completion_tokens=100, energy_j=50.0
            )
        )

    async def fill() -> None:
        for r in records:
            made[0][LEDGER].put(r)
        assert await made[0][LEDGER].flush()

    servers.call(fill())
    return url


@pytest.mark.parametrize("model", MODELS)
def test_label_and_manifest_of_odd_model_names(proxy: str, model: str) -> None:
    with httpx.Client(base_url=proxy, timeout=30) as http:
        svg = http.get(f"/scer/label/{quote(model, safe='')}.svg")
        assert svg.status_code == 200, svg.text[:300]
        assert svg.headers["content-type"].startswith("image/svg+xml")
        ET.fromstring(svg.text)
        manifest = http.get(f"/scer/manifest/{quote(model, safe='')}.yaml")
        assert manifest.status_code == 200, manifest.text[:300]
        parsed = yaml.safe_load(manifest.text)
        assert list(parsed["tree"]["children"]) == [model] and parsed["scer"]["model"] == model
