"""The one table renderer and its number rule."""

from __future__ import annotations

from scer_proxy.cli.tables import fmt_number, table


def test_one_number_rule() -> None:
    assert [fmt_number(v) for v in (None, 0, 12345, 0.18, 1.23456, 999.4, 1234.5, 0.0000123, "B")] == [
        "-",
        "0",
        "12,345",
        "0.180",
        "1.23",
        "999",
        "1,234",
        "0.0000123",
        "B",
    ]


def test_numbers_align_right_text_left_and_the_total_sits_below_a_rule() -> None:
    lines = table(["name", "n"], [["a", 1], ["bbb", None]], ["total", 1000]).splitlines()
    assert lines == [
        "name       n",
        "-----  -----",
        "a          1",
        "bbb        -",
        "-----  -----",
        "total  1,000",
    ]
