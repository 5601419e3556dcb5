"""Tenant text cannot run as a spreadsheet formula or as a terminal escape sequence."""

from __future__ import annotations

import csv
import io

from kubemeter.report.compute import Dimension, build_report
from kubemeter.report.pricing import Pricing
from kubemeter.report.render import to_csv, to_table
from kubemeter.report.safe import csv_cell, terminal_text
from kubemeter.report.statement import build_statement, statement_csv
from kubemeter.report.usage import UsageRow

EVIL = [
    '=HYPERLINK("http://x","y")',
    "+1+1",
    "-2+3",
    "@SUM(A1)",
    "\tcmd",
    "team\x1b[31mred\x1b[0m",
    "a\u202eb",
]


def rows(subjects: list[str]) -> list[UsageRow]:
    return [
        UsageRow(s, "cpu-core-seconds", "core-seconds", s, "", "2026-11-01", 3600, 1, 0) for s in subjects
    ]


def test_csv_cells_that_look_like_formulas_are_quoted_as_text() -> None:
    report = build_report(rows(EVIL), [Dimension.SUBJECT, Dimension.NAMESPACE], Pricing())
    parsed = list(csv.reader(io.StringIO(to_csv(report))))
    cells = {cell for row in parsed[1:] for cell in row[:2]}
    for text in EVIL[:5]:
        assert text not in cells and "'" + text in cells
    statement = list(
        csv.reader(io.StringIO(statement_csv(build_statement(rows(EVIL[:1]), EVIL[0], Pricing()))))
    )
    assert statement[0] == ["customer", "'" + EVIL[0]]
    assert csv_cell("team-a") == "team-a" and csv_cell("") == ""


def test_terminal_table_shows_escape_sequences_instead_of_obeying_them() -> None:
    text = to_table(build_report(rows(EVIL), [Dimension.SUBJECT], Pricing()))
    assert "\x1b" not in text and "\u202e" not in text
    assert "team\\x1b[31mred\\x1b[0m" in text and "a\\u202eb" in text
    assert terminal_text("plain ü ✓") == "plain ü ✓"
