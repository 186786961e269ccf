"""The SCER label (SVG) and its Impact Framework manifest: contents, QR code, same SCI, escaping."""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from typing import Any

import pytest
import yaml
import zxingcpp
from PIL import Image

from scer_proxy.carbon.records import Record
from scer_proxy.carbon.sci import Embodied, request_carbon
from scer_proxy.scer.label import (
    DRAFT_NOTE,
    QR_MAX_VERSION,
    QR_MISSING,
    LabelData,
    fit,
    format_sig3,
    qr_code,
    qr_modules,
    qr_path,
    render_label_svg,
    text_width,
)
from scer_proxy.scer.manifest import (
    Label,
    ManifestInputs,
    inputs_from_records,
    inputs_from_totals,
    make_label,
    manifest_sci,
    manifest_url,
    to_yaml,
    yaml_string,
)
from scer_proxy.summary.build import summarize

SVG = "{http://www.w3.org/2000/svg}"
BASE = "http://127.0.0.1:8080"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
EMBODIED = Embodied(gpu_kg=164.0, server_kg=2500.0, gpus_per_server=8, lifetime_years=4.0, gpus_used=1)


def _inputs(**over: Any) -> ManifestInputs:
    fields: dict[str, Any] = dict(
        energy_j=1.2e5,
        carbon_operational_g=12.8,
        carbon_embodied_g=0.9,
        output_tokens=74_000,
        embodied=EMBODIED,
        started_at=1.75e9,
        duration_s=420.0,
        energy_source="nvml",
        grid_intensity_g_per_kwh=384.0,
    )
    fields.update(over)
    return inputs_from_totals(**fields)


def _label(
    model: str = MODEL, grade: str = "B", peers: int = 12, percentile: float | None = 81.8, **over: Any
) -> Label:
    return make_label(
        model=model,
        task="chat",
        hardware="1 x NVIDIA H100 80GB HBM3",
        inputs=_inputs(**over),
        scoring_date="2025-06-12",
        grade=grade,
        peers=peers,
        percentile=percentile,
        base_url=BASE,
    )


def _texts(root: ET.Element) -> list[str]:
    """The visible text lines: each <text> element's content, tspans joined."""
    return ["".join(el.itertext()) for el in root.iter(f"{SVG}text")]


def _by_id(root: ET.Element, ident: str) -> ET.Element:
    found = [el for el in root.iter() if el.get("id") == ident]
    assert len(found) == 1, ident
    return found[0]


def _decode_qr(root: ET.Element) -> str:
    """Rasterize the QR modules drawn in the label's SVG and decode them with zxing-cpp."""
    group = _by_id(root, "qr")
    rect = group.find(f"{SVG}rect")
    path = group.find(f"{SVG}path")
    assert rect is not None and path is not None
    n = int(rect.get("width", "0"))
    assert n == int(rect.get("height", "0")) and n >= 21 + 8
    px = 8
    image = Image.new("L", (n * px, n * px), 255)
    d = path.get("d", "")
    runs = re.findall(r"M(\d+) (\d+)h(\d+)v1H(\d+)z", d)
    assert runs and "".join(f"M{x} {y}h{w}v1H{x2}z" for x, y, w, x2 in runs) == d
    for x, y, w, _x2 in runs:
        image.paste(0, (int(x) * px, int(y) * px, (int(x) + int(w)) * px, (int(y) + 1) * px))
    results = zxingcpp.read_barcodes(image)
    assert len(results) == 1
    assert results[0].format == zxingcpp.BarcodeFormat.QRCode
    return str(results[0].text)


def test_svg_parses_and_has_the_contract_size() -> None:
    root = ET.fromstring(_label().svg)
    assert root.tag == f"{SVG}svg"
    assert root.get("width") == "260" and root.get("height") == "364"
    assert root.get("viewBox") == "0 0 260 364"
    allowed = {"svg", "title", "desc", "g", "rect", "path", "text", "tspan"}
    assert {el.tag.removeprefix(SVG) for el in root.iter()} <= allowed
    for el in root.iter():
        if el.get("font-size") is not None:
            assert float(el.get("font-size", "0")) >= 7.0


def test_svg_shows_every_contract_element() -> None:
    label = _label()
    root = ET.fromstring(label.svg)
    texts = _texts(root)
    joined = "\n".join(texts)
    assert MODEL in texts
    assert "Task chat" in texts
    assert "Hardware 1 x NVIDIA H100 80GB HBM3" in texts
    assert "Scored 2025-06-12" in texts
    value_line = "".join(_by_id(root, "value-line").itertext())
    assert (
        value_line
        == f"{label.data.value_text} gCO2eq per 1,000 output tokens"
        == "0.185 gCO2eq per 1,000 output tokens"
    )
    assert "/" not in value_line
    assert "".join(_by_id(root, "energy-line").itertext()) == "0.450 Wh per 1,000 output tokens"
    for letter in ("A", "B", "C"):
        assert letter in texts
    pointer = ["".join(el.itertext()) for el in _by_id(root, "pointer").iter(f"{SVG}text")]
    assert pointer == ["B"]
    assert "12 peers" in joined and "82nd percentile" in joined
    assert "Follows SCI 1.1" in texts
    assert DRAFT_NOTE == "SCER is a draft specification of the Green Software Foundation"
    assert DRAFT_NOTE in texts
    assert "Energy: measured (NVML)" in texts
    assert "Grid: 384 gCO2eq per kWh" in texts


def test_qr_code_in_the_label_decodes_to_the_manifest_url() -> None:
    label = _label()
    root = ET.fromstring(label.svg)
    url = _decode_qr(root)
    assert url == label.data.manifest_url == manifest_url(BASE, MODEL)
    assert url == "http://127.0.0.1:8080/scer/manifest/meta-llama%2FLlama-3.1-8B-Instruct.yaml"
    # drawn inside the label, at least 1.5 px per module, the quiet zone included
    transform = _by_id(root, "qr").get("transform", "")
    match = re.fullmatch(r"translate\(([\d.]+) ([\d.]+)\) scale\(([\d.]+)\)", transform)
    assert match
    x, y, scale = (float(v) for v in match.groups())
    n = len(qr_modules(url))
    assert scale >= 1.5 and 0 <= x and x + n * scale <= 260 and 0 <= y and y + n * scale <= 364


def test_qr_code_decodes_for_a_long_url_and_odd_characters() -> None:
    model = 'org/Model with spaces & "quotes" ü-70B'
    label = make_label(
        model=model,
        task="chat",
        hardware="8 x NVIDIA H200",
        inputs=_inputs(),
        scoring_date="2025-06-12",
        grade="A",
        peers=3,
        percentile=100.0,
        base_url="https://scer.example.org:8443/some/prefix",
    )
    assert _decode_qr(ET.fromstring(label.svg)) == label.data.manifest_url
    assert label.data.manifest_url.endswith(
        "/scer/manifest/org%2FModel%20with%20spaces%20%26%20%22quotes%22%20%C3%BC-70B.yaml"
    )


def test_manifest_sci_equals_the_label_value() -> None:
    label = _label()
    manifest = yaml.safe_load(label.yaml)
    assert manifest == label.manifest
    assert manifest_sci(manifest) == label.data.sci_g_per_1k_output_tokens
    assert manifest["scer"]["sci"] == label.data.sci_g_per_1k_output_tokens
    assert format_sig3(manifest_sci(manifest)) == manifest["scer"]["label-value"] == label.data.value_text
    shown = _by_id(ET.fromstring(label.svg), "value-line").find(f"{SVG}tspan")
    assert shown is not None and shown.text == manifest["scer"]["label-value"]
    child = manifest["tree"]["children"][MODEL]
    assert child["aggregated"]["sci"] == child["outputs"][0]["sci"] == manifest_sci(manifest)


def _run_pipeline(manifest: dict[str, Any]) -> dict[str, Any]:
    """What if-run's builtins Multiply, Divide, Sum and Sci compute for the first input of the first child."""
    plugins = manifest["initialize"]["plugins"]
    child = next(iter(manifest["tree"]["children"].values()))
    row: dict[str, Any] = {**child["defaults"], **child["inputs"][0]}
    for name in child["pipeline"]["compute"]:
        plugin = plugins[name]
        config = plugin["config"]
        method = plugin["method"]
        if method == "Multiply":
            row[config["output-parameter"]] = math.prod(row[p] for p in config["input-parameters"])
        elif method == "Sum":
            row[config["output-parameter"]] = sum(row[p] for p in config["input-parameters"])
        elif method == "Divide":
            den = config["denominator"]
            row[config["output"]] = row[config["numerator"]] / (row[den] if isinstance(den, str) else den)
        elif method == "Sci":
            row["sci"] = row["carbon"] / row[config["functional-unit"]]
        else:  # pragma: no cover
            raise AssertionError(method)
    return row


def test_manifest_is_an_impact_framework_manifest() -> None:
    label = _label()
    manifest = yaml.safe_load(label.yaml)
    assert isinstance(manifest["name"], str) and isinstance(manifest["description"], str)
    assert set(manifest["tags"]) <= {"kind", "complexity", "category"}
    assert manifest["aggregation"]["type"] in {"horizontal", "time", "vertical", "component", "both"}
    for plugin in manifest["initialize"]["plugins"].values():
        assert plugin["path"] == "builtin" and plugin["method"] in {"Multiply", "Divide", "Sum", "Sci"}
        for side in plugin.get("parameter-metadata", {}).values():
            for meta in side.values():
                assert set(meta) == {"unit", "description", "aggregation-method"}
                assert set(meta["aggregation-method"]) == {"time", "component"}
    child = manifest["tree"]["children"][MODEL]
    assert set(child["pipeline"]) == {"compute"}
    assert set(child["pipeline"]["compute"]) <= set(manifest["initialize"]["plugins"])
    observation = {**child["defaults"], **child["inputs"][0]}
    # SCI's inputs, with their units in the parameter metadata
    for key in (
        "timestamp",
        "duration",
        "energy",
        "grid/carbon-intensity",
        "device/emissions-embodied",
        "time-reserved",
        "device/expected-lifespan",
        "resources-reserved",
        "resources-total",
        "output-tokens",
    ):
        assert key in observation, key
    assert observation["duration"] >= 1
    # the pipeline as if-run computes it gives the label's SCI and the outputs written
    row = _run_pipeline(manifest)
    assert row["sci"] == manifest_sci(manifest) == label.data.sci_g_per_1k_output_tokens
    assert row == child["outputs"][0]
    # the functional unit and the boundary
    scer = manifest["scer"]
    assert scer["functional-unit"] == {
        "name": "1,000 output tokens",
        "parameter": "output-tokens",
        "per": 1000,
    }
    assert manifest["initialize"]["plugins"]["sci"]["config"]["functional-unit"] == "output-tokens-thousands"
    included = " ".join(scer["boundary"]["included"])
    excluded = " ".join(scer["boundary"]["excluded"])
    assert "GPU" in included and "embodied" in included
    assert "client devices" in excluded and "network" in excluded and "training" in excluded
    assert scer["sci-version"] == "SCI 1.1" and scer["grade"] == "B" and scer["peers"] == 12


def test_manifest_reproduces_the_submitted_carbon() -> None:
    inputs = _inputs()
    assert inputs.carbon_operational_g() == pytest.approx(12.8, rel=1e-12)
    assert inputs.carbon_embodied_g() == pytest.approx(0.9, rel=1e-12)
    assert inputs.sci() == pytest.approx(13.7 * 1000 / 74_000, rel=1e-12)
    assert inputs.energy_wh_per_1k_output_tokens() == pytest.approx(1.2e5 / 3600 / 74, rel=1e-12)
    with_time = _inputs(hardware_s=100.0)
    assert with_time.time_reserved_s == 100.0


def test_inputs_from_records_match_the_summary() -> None:
    records = []
    for i, (joules, tokens, hw_s, intensity) in enumerate(
        [(900.0, 300, 2.0, 380.0), (450.0, 120, 1.1, 390.0), (1300.0, 512, 3.3, 385.0)]
    ):
        carbon = request_carbon(
            energy_j=joules, hw_s=hw_s, intensity_g_per_kwh=intensity, embodied=EMBODIED, units=tokens
        )
        records.append(
            Record(
                request_id=f"r{i}",
                model=MODEL,
                upstream="u",
                tenant="t",
                endpoint="chat/completions",
                stream=False,
                started_at=1000.0 + i,
                ended_at=1002.0 + i,
                status="ok",
                completion_tokens=tokens,
                energy_j=joules,
                energy_source="nvml",
                hardware_s=hw_s,
                carbon_g=carbon.total_g,
                carbon_operational_g=carbon.operational_g,
                carbon_embodied_g=carbon.embodied_g,
                grid_intensity_g_per_kwh=intensity,
                sci=carbon.sci_g_per_unit,
                settled=True,
            )
        )
    inputs = inputs_from_records(records, embodied=EMBODIED)
    summary = summarize(records, start=None, end=2000.0)
    assert inputs.sci() == pytest.approx(summary["totals"]["sci"], rel=1e-12)
    assert inputs.output_tokens == 932 and inputs.duration_s == 4.0 and inputs.energy_source == "nvml"
    with pytest.raises(ValueError):
        inputs_from_records([], embodied=EMBODIED)


def test_xml_special_characters_are_escaped() -> None:
    model = 'evil<script>alert("x")</script>&co'
    label = _label(model=model)
    svg = label.svg
    assert "<script>" not in svg and "&co" not in svg.replace("&amp;co", "")
    root = ET.fromstring(svg)
    assert model in _texts(root)
    assert _decode_qr(root) == label.data.manifest_url
    manifest = yaml.safe_load(label.yaml)
    assert model in manifest["tree"]["children"]
    control = LabelData(
        model="a\x00b\x1bc",
        task="chat",
        hardware="h",
        scoring_date="2025-06-12",
        sci_g_per_1k_output_tokens=1.0,
        energy_wh_per_1k_output_tokens=1.0,
        grade="C",
        peers=2,
        manifest_url="http://x/m.yaml",
    )
    assert "abc" in _texts(ET.fromstring(render_label_svg(control)))


def test_long_text_is_cut_with_an_ellipsis() -> None:
    model = "an-organisation-with-a-long-name/" + "Very-Long-Model-Name-" * 6 + "Instruct"
    label = _label(model=model)
    texts = _texts(ET.fromstring(label.svg))
    first = next(t for t in texts if t.startswith("an-organisation"))
    assert first.endswith("\u2026") and len(first) < len(model)
    assert text_width(first, 13, bold=True) <= 236


@pytest.mark.parametrize("length", [300, 458, 470, 1000, 1030, 5000, 100_000])
def test_long_model_names_give_a_label_and_a_valid_manifest(length: int) -> None:
    """A name of any length: the label cuts it with an ellipsis and keeps its QR code while the URL fits
    one that scans (a note in its place beyond); the manifest parses back with the whole name."""
    model = ("org/" + "Model-Name-" * (length // 11 + 1))[:length]
    label = _label(model=model)
    root = ET.fromstring(label.svg)
    shown = next(t for t in _texts(root) if t.startswith("org/"))
    assert shown.endswith("\u2026") and text_width(shown, 13, bold=True) <= 236
    code = qr_code(label.data.manifest_url)
    if code is not None:
        assert code.version <= QR_MAX_VERSION
        assert _decode_qr(root) == label.data.manifest_url
        transform = _by_id(root, "qr").get("transform", "")
        scale = float(transform.rsplit("scale(", 1)[1].rstrip(")"))
        assert scale >= 1.0  # at least a pixel a module at 1x
    else:
        assert not [el for el in root.iter() if el.get("id") == "qr"]
        note = " ".join("".join(el.itertext()) for el in _by_id(root, "qr-missing").iter(f"{SVG}text"))
        assert note == " ".join(QR_MISSING)
    assert (code is not None) == (len(label.data.manifest_url.encode()) <= 504)  # version 17, level M
    manifest = yaml.safe_load(label.yaml)
    assert manifest == label.manifest
    assert list(manifest["tree"]["children"]) == [model] and manifest["scer"]["model"] == model
    assert manifest_sci(manifest) == label.data.sci_g_per_1k_output_tokens


@pytest.mark.parametrize(
    "model",
    [
        'org/"quoted": model',
        "key: value",
        "line one\nline two\r\n",
        "- dash",
        "? question",
        "# hash",
        "{flow: [seq]}",
        "tab\there",
        "'single'",
        "a" * 990 + ': "' + "é" * 40,  # an escaped key that crosses YAML's 1024-character limit
        "\x1b[31mred\x1b[0m",
        "\u202eevil",
    ],
)
def test_odd_model_names_round_trip_through_yaml_and_svg(model: str) -> None:
    label = _label(model=model)
    manifest = yaml.safe_load(label.yaml)
    assert manifest == label.manifest
    assert list(manifest["tree"]["children"]) == [model]
    assert manifest["scer"]["model"] == model and manifest["name"] == f"scer-label {model}"
    root = ET.fromstring(label.svg)  # XML-escaped, the characters XML cannot hold dropped
    title = root.find(f"{SVG}title")
    assert title is not None and (title.text or "").startswith("SCER label: ")
    if qr_code(label.data.manifest_url) is not None:
        assert _decode_qr(root) == label.data.manifest_url


def test_fit_cuts_at_the_same_place_as_one_character_at_a_time() -> None:
    """One pass gives the longest prefix that fits with the ellipsis, as trimming a character at a time
    did (which took seconds for a name of 100,000 characters)."""

    def reference(text: str, size: float, width: float) -> str:
        text = " ".join(text.split())
        if text_width(text, size) <= width:
            return text
        while text and text_width(text + "\u2026", size) > width:
            text = text[:-1]
        return text.rstrip() + "\u2026"

    rng = __import__("random").Random(3)
    alphabet = "abcdefghijWXYZ0123 _-/.\u4e2d\u0301\u00fc"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 120)))
        size, width = rng.choice([7.5, 9.5, 13.0]), rng.uniform(5, 240)
        assert fit(text, size, width) == reference(text, size, width), (text, size, width)
    assert fit("x" * 1_000_000, 13, 236).endswith("\u2026")


def test_unrated_label_renders() -> None:
    label = _label(grade="unrated", peers=1, percentile=None)
    root = ET.fromstring(label.svg)
    pointer = " ".join("".join(el.itertext()) for el in _by_id(root, "pointer").iter(f"{SVG}text"))
    assert "unrated" in pointer
    joined = "\n".join(_texts(root))
    assert "unrated: 1 peer in its category" in joined
    assert _decode_qr(root) == label.data.manifest_url
    assert yaml.safe_load(label.yaml)["scer"]["grade"] == "unrated"


def test_bad_label_data_is_refused() -> None:
    good: dict[str, Any] = dict(
        model="m",
        task="chat",
        hardware="h",
        scoring_date="2025-06-12",
        sci_g_per_1k_output_tokens=1.0,
        energy_wh_per_1k_output_tokens=1.0,
        grade="A",
        peers=3,
        manifest_url="http://x/m.yaml",
    )
    LabelData(**good)
    for key, bad in [
        ("grade", "D"),
        ("sci_g_per_1k_output_tokens", math.nan),
        ("peers", -1),
        ("scoring_date", "yesterday"),
        ("manifest_url", ""),
    ]:
        with pytest.raises(ValueError):
            LabelData(**{**good, key: bad})
    with pytest.raises(ValueError):
        _inputs(output_tokens=0)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.18312, "0.183"),
        (0.18, "0.180"),
        (12345.0, "12300"),
        (0.00001234, "0.0000123"),
        (0.9996, "1.00"),
        (999.6, "1000"),
        (1.0, "1.00"),
        (0.0, "0"),
        (1.5e-7, "0.000000150"),
        (2.5e9, "2500000000"),
    ],
)
def test_three_significant_digits_plain_decimals(value: float, text: str) -> None:
    assert format_sig3(value) == text


@pytest.mark.parametrize(
    "text",
    [
        "plain",
        "yes",
        "No",
        "null",
        "~",
        "123",
        "1.5",
        "0x1F",
        "a: b",
        "- x",
        "#x",
        "x #y",
        "'q'",
        '"q"',
        "",
        " lead",
        "trail ",
        "multi\nline",
        "tab\there",
        "bell\x07",
        "ü and 中文",
        "emoji 😀",
        "2025-06-12",
        "a/b",
        "@x",
        "`x",
        "!tag",
        "&anchor",
        "*alias",
        "{x}",
        "[x]",
        "%x",
        "|x",
        ">x",
        "?x",
        "\u2028",
        "\x85",
    ],
)
def test_yaml_strings_round_trip(text: str) -> None:
    parsed = yaml.safe_load(f"key: {yaml_string(text)}\n")
    assert parsed == {"key": text}


def test_yaml_numbers_round_trip() -> None:
    values: dict[str, Any] = {
        "a": 1.5e-7,
        "b": 0.1 + 0.2,
        "c": 3812000.0,
        "d": 1e21,
        "e": 5,
        "f": True,
        "g": None,
        "h": [],
        "i": {},
        "j": [[1, 2], {"k": "v"}],
        "k": 2.0**-40,
    }
    assert yaml.safe_load(to_yaml(values)) == values


def test_qr_path_covers_exactly_the_dark_modules() -> None:
    modules = qr_modules("http://example.org/scer/manifest/m.yaml")
    n = len(modules)
    grid = [[False] * n for _ in range(n)]
    for x, y, w, _ in re.findall(r"M(\d+) (\d+)h(\d+)v1H(\d+)z", qr_path(modules)):
        for i in range(int(x), int(x) + int(w)):
            grid[int(y)][i] = True
    assert grid == modules
    assert not any(modules[0]) and not any(row[0] for row in modules)  # the quiet zone
