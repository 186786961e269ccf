"""The label, its manifest and the bench submission agree; the QR code opens its manifest with an admin
token set; the label names what the grade ranks and where its figures come from; its colours meet WCAG AA.

Measured before: ``label --submission`` took the embodied figures of the GPU family's preset and wrote
``pue: 1.0``: the label said 0.0406, the submission 0.0441 and the manifest behind the QR code 0.0454
gCO2e per 1,000 output tokens; with ``server.admin_token`` set the QR code's URL answered 401; white text
on the orange and green grades had a contrast of 2.28 and 3.19 to 1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import yaml

from scer_proxy.cli.bench import run_bench
from scer_proxy.cli.label import label_from_submission
from scer_proxy.scer.label import GRADES, LabelData, format_sig3, render_label_svg
from scer_proxy.scer.manifest import inputs_from_submission, make_label, manifest_sci, manifest_url
from scer_proxy.sim import create_sim_app, get_profile
from tests.conftest import proxy_config
from tests.scer.test_label import _by_id, _decode_qr, _inputs, _label
from tests.servers import ThreadedServers

SVG = "{http://www.w3.org/2000/svg}"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
TOKEN = "s3cret-admin-token"

# ---------------------------------------------------------------- WCAG contrast, from the drawn SVG


def luminance(color: str) -> float:
    """WCAG 2.1 relative luminance of ``#rrggbb``."""
    assert re.fullmatch(r"#[0-9a-fA-F]{6}", color), color
    channels = [int(color[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_contrast_formula_matches_wcag_examples() -> None:
    assert contrast("#ffffff", "#000000") == pytest.approx(21.0)
    assert contrast("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)
    assert contrast("#ffffff", "#00a651") == pytest.approx(3.19, abs=0.01)  # the old A: below AA
    assert contrast("#ffffff", "#f7941d") == pytest.approx(2.28, abs=0.01)  # the old C: below AA


Box = tuple[float, float, float, float]  # x0, y0, x1, y1


def _numbers(tokens: list[str], start: int, n: int) -> list[float]:
    return [float(t) for t in tokens[start : start + n]]


def path_box(d: str) -> Box:
    """The bounding box of a path's points (the commands the label draws with: M H V L A Z, both cases;
    an arc by its end points, enough for the label's rounded corners)."""
    tokens = re.findall(r"[MmHhVvLlAaZz]|-?\d*\.?\d+(?:e-?\d+)?", d)
    xs: list[float] = []
    ys: list[float] = []
    x = y = 0.0
    i, cmd = 0, ""
    while i < len(tokens):
        if tokens[i].isalpha():
            cmd = tokens[i]
            i += 1
            if cmd in "Zz":
                continue
        if cmd in "Mm" or cmd in "Ll":
            dx, dy = _numbers(tokens, i, 2)
            x, y = (x + dx, y + dy) if cmd.islower() else (dx, dy)
            i += 2
        elif cmd in "Hh":
            (v,) = _numbers(tokens, i, 1)
            x = x + v if cmd == "h" else v
            i += 1
        elif cmd in "Vv":
            (v,) = _numbers(tokens, i, 1)
            y = y + v if cmd == "v" else v
            i += 1
        elif cmd in "Aa":
            *_, ex, ey = _numbers(tokens, i, 7)
            x, y = (x + ex, y + ey) if cmd == "a" else (ex, ey)
            i += 7
        else:  # pragma: no cover - a command the label does not use
            raise AssertionError(cmd)
        xs.append(x)
        ys.append(y)
    return min(xs), min(ys), max(xs), max(ys)


def text_pairs(svg: str) -> list[tuple[str, str, str]]:
    """(text, its colour, the colour drawn under it) for every piece of visible text: the background is
    the topmost filled shape drawn before the text that contains the middle of its first glyphs."""
    root = ET.fromstring(svg)
    shapes: list[tuple[Box, str]] = []
    pairs: list[tuple[str, str, str]] = []

    def visit(el: ET.Element, dx: float, dy: float, scale: float) -> None:
        tag = el.tag.removeprefix(SVG)
        if tag in ("title", "desc"):
            return
        if tag == "g":
            match = re.fullmatch(r"translate\(([\d.]+) ([\d.]+)\) scale\(([\d.]+)\)", el.get("transform", ""))
            if match:
                dx, dy, scale = (float(v) for v in match.groups())
        fill = el.get("fill")
        if tag in ("rect", "path") and fill not in (None, "none"):
            if tag == "rect":
                x0, y0 = float(el.get("x", "0")), float(el.get("y", "0"))
                box = (x0, y0, x0 + float(el.get("width", "0")), y0 + float(el.get("height", "0")))
            else:
                box = path_box(el.get("d", ""))
            box = (dx + box[0] * scale, dy + box[1] * scale, dx + box[2] * scale, dy + box[3] * scale)
            if box[2] > box[0] and box[3] > box[1]:
                shapes.append((box, str(fill)))
        if tag == "text":
            size = float(el.get("font-size", "9.5"))
            x, y = float(el.get("x", "0")), float(el.get("y", "0"))
            anchor = el.get("text-anchor", "start")
            px = x + 2 if anchor == "start" else (x - 2 if anchor == "end" else x)
            py = y - 0.35 * size
            under = next(f for (x0, y0, x1, y1), f in reversed(shapes) if x0 <= px <= x1 and y0 <= py <= y1)
            own = el.get("fill", "#000000")
            if (el.text or "").strip():
                pairs.append((el.text or "", own, under))
            for span in el.iter(f"{SVG}tspan"):
                if "".join(span.itertext()).strip():
                    pairs.append(("".join(span.itertext()), span.get("fill", own), under))
            return
        for child in el:
            visit(child, dx, dy, scale)

    visit(root, 0.0, 0.0, 1.0)
    return pairs


def _variants() -> Iterator[tuple[str, str]]:
    for grade in GRADES:
        yield f"grade {grade}", _label(grade=grade).svg
    yield "unrated", _label(grade="unrated", peers=1, percentile=None).svg
    long = LabelData(  # the QR code's place taken by its note (a URL too long for one)
        model="m" * 600,
        task="chat",
        hardware="h",
        scoring_date="2025-06-12",
        sci_g_per_1k_output_tokens=1.0,
        energy_wh_per_1k_output_tokens=1.0,
        grade="C",
        peers=2,
        manifest_url="http://x/" + "m" * 600,
        figures_from="benchmark",
    )
    yield "no QR code", render_label_svg(long)


@pytest.mark.parametrize(("name", "svg"), list(_variants()), ids=[n for n, _ in _variants()])
def test_every_text_meets_wcag_aa_on_what_it_is_drawn_on(name: str, svg: str) -> None:
    pairs = text_pairs(svg)
    assert len(pairs) > 15, name
    low = [(t, fg, bg, round(contrast(fg, bg), 2)) for t, fg, bg in pairs if contrast(fg, bg) < 4.5]
    assert low == [], low
    # the grade letters on their coloured arrows are among the pairs checked
    backgrounds = {bg for _t, _fg, bg in pairs}
    assert {"#007a3d", "#ffd200", "#f7941d"} <= backgrounds


# ---------------------------------------------------------------- what the label says it shows


def test_the_label_names_what_the_grade_ranks_and_where_its_figures_come_from() -> None:
    label = make_label(
        model=MODEL,
        task="chat",
        hardware="1 x NVIDIA H100 80GB HBM3",
        inputs=_inputs(),
        scoring_date="2025-06-12",
        grade="B",
        peers=12,
        percentile=81.8,
        base_url="http://127.0.0.1:8080",
        grade_j_per_1k_output_tokens=171.4,
    )
    root = ET.fromstring(label.svg)
    lines = ["".join(el.itertext()) for el in _by_id(root, "peers").iter(f"{SVG}text")]
    assert lines == [
        "Grade B: benchmark GPU energy, 171 J per 1,000 output tokens",
        "82nd percentile among 12 peers in its category",
    ]
    assert "".join(_by_id(root, "figures-from").itertext()) == "LIVE TRAFFIC: SOFTWARE CARBON INTENSITY"
    scer = label.manifest["scer"]
    assert scer["figures-from"] == "live traffic"
    assert scer["grade-basis"]["j-per-1k-output-tokens"] == 171.4 and scer["grade-basis"]["peers"] == 12
    unrated = ET.fromstring(_label(grade="unrated", peers=1, percentile=None).svg)
    lines = ["".join(el.itertext()) for el in _by_id(unrated, "peers").iter(f"{SVG}text")]
    assert lines == ["unrated: 1 peer in its category", "Grades rank benchmark GPU energy per 1,000 tokens"]


def test_a_submission_without_its_configuration_still_reproduces_its_carbon() -> None:
    """Older submissions: the PUE is their energy over their GPU energy; the embodied share is the one
    they recorded (the hardware time derived under the family preset), not the preset's own figure."""
    repeats = [
        {
            "energy_j": 1300.0,
            "gpu_energy_j": 1000.0,
            "carbon_operational_g": 0.13,
            "carbon_embodied_g": 0.004,
            "output_tokens": 4000,
            "hardware_s": 7.0,
            "started_at": 100.0,
            "ended_at": 110.0,
        }
        for _ in range(3)
    ]
    sub = {"model": "m", "hardware": {"gpu_model": "H100", "gpu_count": 1}, "repeats": repeats, "result": {}}
    inputs = inputs_from_submission(sub)
    assert inputs.pue == pytest.approx(1.3)
    assert inputs.carbon_operational_g() == pytest.approx(0.39, rel=1e-12)
    assert inputs.carbon_embodied_g() == pytest.approx(0.012, rel=1e-12)
    assert inputs.sci() == pytest.approx(0.402 * 1000 / 12000, rel=1e-12)
    with pytest.raises(ValueError, match="per-repeat"):
        inputs_from_submission({"model": "m", "repeats": [{"energy_j": 1.0}]})


# ---------------------------------------------------------------- through a proxy with an admin token


@pytest.fixture
def guarded_proxy(servers: ThreadedServers) -> str:
    sim = servers.start(lambda: create_sim_app(get_profile("llama-3.1-8b-h100"), time_scale=10.0))
    config = proxy_config(
        sim,
        meter={"kind": "simulated", "interval_ms": 10},
        server={"admin_token": TOKEN},
        carbon={"pue": 1.3},
        embodied={"gpu_kg": 100.0, "server_kg": 1800.0, "gpus_per_server": 4, "lifetime_years": 5.0},
    )
    from scer_proxy.app import create_app

    return servers.start(lambda: create_app(config), handler_cancellation=True)


def _get(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(url, timeout=30, **kwargs)


def test_label_manifest_and_submission_agree_and_the_qr_code_opens(
    guarded_proxy: str, tmp_path: Path
) -> None:
    proxy = guarded_proxy
    auth = {"Authorization": f"Bearer {TOKEN}"}
    submission = asyncio.run(
        run_bench(proxy, MODEL, concurrency=40, requests=48, repeats=3, progress=False, admin_token=TOKEN)
    )
    assert httpx.post(f"{proxy}/scer/submissions", json=submission, headers=auth).status_code == 201
    # The submission records the configuration its records were computed under.
    config = submission["configuration"]
    assert config["pue"] == 1.3 and config["idle_policy"] == "amortize" and config["upstreams"] == ["up"]
    assert config["embodied"] == {
        "gpu_kg": 100.0,
        "server_kg": 1800.0,
        "gpus_per_server": 4,
        "lifetime_years": 5.0,
        "gpus_used": 1,
    }
    records = _get(f"{proxy}/scer/requests?limit=10000", headers=auth).json()["data"]
    assert config["grid"]["sources"] == sorted({r["grid_source"] for r in records})
    assert config["grid"]["intensity_g_per_kwh"] == pytest.approx(records[0]["grid_intensity_g_per_kwh"])

    # The label written from the submission file: its QR code opens the proxy's manifest of the same
    # submission, without the token.
    path = tmp_path / "sub.json"
    path.write_text(json.dumps(submission))
    label = label_from_submission(str(path), MODEL, proxy)
    root = ET.fromstring(label.svg)
    url = _decode_qr(root)
    assert (
        url
        == manifest_url(proxy, MODEL, "benchmark")
        == f"{proxy}/scer/manifest/{quote(MODEL, safe='')}.yaml?from=benchmark"
    )
    assert _get(f"{proxy}/scer/summary").status_code == 401  # the token is set
    resp = _get(url)
    assert resp.status_code == 200, resp.text
    served = yaml.safe_load(resp.text)

    # One SCI, to the last printed digit: the label, the manifest behind its QR code, the submission.
    shown = _by_id(root, "value-line").find(f"{SVG}tspan")
    assert shown is not None
    printed = {
        "label": shown.text,
        "manifest": served["scer"]["label-value"],
        "manifest sci": format_sig3(manifest_sci(served)),
        "written manifest": label.manifest["scer"]["label-value"],
        "submission": format_sig3(submission["result"]["sci_g_per_1k_output_tokens"]),
    }
    assert len(set(printed.values())) == 1, printed
    assert manifest_sci(served) == pytest.approx(submission["result"]["sci_g_per_1k_output_tokens"], rel=1e-9)
    # ... and it is the records' own carbon per 1,000 output tokens, under the configuration they had.
    carbon = sum(rep["carbon_g"] for rep in submission["repeats"])
    tokens = sum(rep["output_tokens"] for rep in submission["repeats"])
    assert submission["result"]["sci_g_per_1k_output_tokens"] == pytest.approx(
        carbon * 1000 / tokens, rel=1e-9
    )
    assert served["scer"]["pue"] == 1.3 and served["scer"]["configuration"] == config
    assert served["scer"]["figures-from"] == "benchmark"
    assert "".join(_by_id(root, "figures-from").itertext()).startswith("BENCHMARK:")

    # The live label, public too: its grade line names the benchmark figure it ranks, apart from the
    # live-traffic figures below it, and its QR code opens the live manifest.
    live = _get(f"{proxy}/scer/label/{quote(MODEL, safe='')}.svg")
    assert live.status_code == 200, live.text
    live_root = ET.fromstring(live.text)
    ranked = format_sig3(submission["result"]["j_per_1k_output_tokens"])
    first = "".join(next(_by_id(live_root, "peers").iter(f"{SVG}text")).itertext())
    assert first.startswith(f"Grade {served['scer']['grade']}: benchmark GPU energy, {ranked} J")
    assert "".join(_by_id(live_root, "figures-from").itertext()) == "LIVE TRAFFIC: SOFTWARE CARBON INTENSITY"
    live_url = _decode_qr(live_root)
    assert live_url == manifest_url(proxy, MODEL)
    live_manifest = _get(live_url)
    assert live_manifest.status_code == 200
    assert yaml.safe_load(live_manifest.text)["scer"]["pue"] == 1.3
    # The benchmark label the proxy serves is the same as the one written from the file.
    same = _get(f"{proxy}/scer/label/{quote(MODEL, safe='')}.svg", params={"from": "benchmark"})
    assert same.status_code == 200 and _decode_qr(ET.fromstring(same.text)) == url
    assert _get(f"{proxy}/scer/label/x.svg", params={"from": "elsewhere"}).status_code == 400
    assert _get(f"{proxy}/scer/label/no-such-model.svg", params={"from": "benchmark"}).status_code == 404


def test_labels_need_the_token_when_not_public(servers: ThreadedServers, fake_upstream: str) -> None:
    from scer_proxy.app import create_app

    config = proxy_config(fake_upstream, server={"admin_token": TOKEN, "public_labels": False})
    proxy = servers.start(lambda: create_app(config), handler_cancellation=True)
    for path in ("/scer/label/m.svg", "/scer/manifest/m.yaml"):
        assert _get(proxy + path).status_code == 401
        assert _get(proxy + path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
    public = dataclasses.replace(config, server=dataclasses.replace(config.server, public_labels=True))
    proxy = servers.start(lambda: create_app(public), handler_cancellation=True)
    assert _get(proxy + "/scer/label/m.svg").status_code == 404  # through the gate: no requests yet
    assert _get(proxy + "/scer/summary").status_code == 401
