"""``scer-proxy report``: rendering and reading the ledger database (``main_report`` called directly)."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import random
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
