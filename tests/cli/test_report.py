"""``scer-proxy report``: rendering and reading the ledger database (``main_report`` called directly)."""

from __future__ import annotations

import argparse
import asyncio
import csv
import dataclasses
import io
import random
import unicodedata
from pathlib import Path

import orjson
import pytest

from scer_proxy.cli.report import add_report_arguments, main_report, render
from scer_proxy.ledger.sqlite import SqliteLedger
from tests.ledger.test_ledger import make_record


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_report_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "scer.db"
    records = [make_record(i, rng=random.Random(i)) for i in range(40)]

    async def fill() -> None:
        ledger = SqliteLedger(path)
        await ledger.open()
        for r in records:
            ledger.put(r)
        await ledger.close()

    asyncio.run(fill())
    return path


def test_report_formats_from_the_database(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main_report(parse(["--db", str(db), "--format", "json"])) == 0
    summary = orjson.loads(capsys.readouterr().out)
    assert {"window", "totals", "models", "tenants"} <= summary.keys()
    assert main_report(parse(["--db", str(db), "--format", "csv"])) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows[-1]["model"] == "total"
    assert int(rows[-1]["requests"]) == summary["totals"]["requests"]
    assert sum(int(r["requests"]) for r in rows[:-1]) == summary["totals"]["requests"]
    assert float(rows[-1]["energy_wh"]) == pytest.approx(summary["totals"]["energy_j"] / 3600)
    assert main_report(parse(["--db", str(db), "--since", "1h"])) == 0
    table = capsys.readouterr().out
    assert "gCO2e per 1,000 output tokens" in table and "grade" in table and "total" in table


def test_report_bad_usage_is_one_line_exit_2(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (
        ["--db", str(tmp_path / "absent.db")],
        ["--db", str(db), "--since", "yesterday"],
        ["--prometheus", "prometheus:9090"],
    ):
        assert main_report(parse(argv)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("scer-proxy report: ")


@pytest.mark.parametrize("since", ["99999999999d", "9" * 400 + "d", "-1h", "nan", "inf", "36501d", "٣h"])
def test_report_since_out_of_range_is_one_line_exit_2(
    db: Path, capsys: pytest.CaptureFixture[str], since: str
) -> None:
    assert main_report(parse(["--db", str(db), f"--since={since}"])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("scer-proxy report: --since: ")
    assert len(err) < 200


HOSTILE = [
    "title\x1b]0;pwned\x07\x1b[2Jgone",  # set the window title, clear the screen
    "cr\roverwritten",
    '=HYPERLINK("http://x","y")',
    "+1+1",
    "-2+3",
    "@SUM(A1:A2)",
    "\ttab",
    "\rcarriage",
    "\u202eevil-override",
    "csi\x9b31m",
    "nul\x00del\x7f",
]


@pytest.fixture
def hostile_db(tmp_path: Path) -> Path:
    path = tmp_path / "hostile.db"
    rng = random.Random(1)
    records = [
        dataclasses.replace(make_record(i, rng=rng), model=model, status="ok")
        for i, model in enumerate(HOSTILE * 2)
    ]

    async def fill() -> None:
        ledger = SqliteLedger(path)
        await ledger.open()
        for r in records:
            ledger.put(r)
        await ledger.close()

    asyncio.run(fill())
    return path


def _unsafe(text: str) -> list[str]:
    """The characters a terminal acts on, but the line breaks between rows."""
    return [
        c
        for c in text
        if c != "\n"
        and (unicodedata.category(c) == "Cc" or c in "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
    ]


def test_report_never_prints_control_characters(hostile_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for fmt in ("table", "csv", "json"):
        assert main_report(parse(["--db", str(hostile_db), "--format", fmt])) == 0
        out = capsys.readouterr().out
        assert not _unsafe(out), (fmt, _unsafe(out))
    assert main_report(parse(["--db", str(hostile_db), "--format", "table"])) == 0
    table = capsys.readouterr().out
    assert "title\\x1b]0;pwned\\x07\\x1b[2Jgone" in table and "cr\\x0doverwritten" in table
    assert "\\u202eevil-override" in table and "csi\\x9b31m" in table
    rows = table.splitlines()
    assert len(rows) == 3 + len(HOSTILE) + 2


def test_report_json_keeps_the_names_exactly(hostile_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main_report(parse(["--db", str(hostile_db), "--format", "json"])) == 0
    summary = orjson.loads(capsys.readouterr().out)
    assert sorted(m["model"] for m in summary["models"]) == sorted(HOSTILE)


def test_report_csv_cells_are_never_formulas(hostile_db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main_report(parse(["--db", str(hostile_db), "--format", "csv"])) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == len(HOSTILE) + 1
    for row in rows:
        for value in row.values():
            assert not value.startswith(("=", "+", "-", "@", "\t", "\r")), row
    models = {r["model"] for r in rows}
    for name in (
        '\'=HYPERLINK("http://x","y")',
        "'+1+1",
        "'-2+3",
        "'@SUM(A1:A2)",
        "'\\x09tab",
        "'\\x0dcarriage",
    ):
        assert name in models, (name, models)


def test_render_handles_an_empty_summary() -> None:
    empty = {
        "window": {"start": None, "end": 1.0},
        "models": [],
        "tenants": [],
        "totals": {
            "requests": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "energy_j": None,
            "carbon_g": None,
            "sci": None,
        },
    }
    assert "total" in render(empty, "table")
    assert render(empty, "csv").splitlines()[1].startswith("total,0,0,0,,,")
