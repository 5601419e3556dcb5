"""`make demo` runs start to finish, and its chargeback table is the sink's totals and the ground truth."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

from testbed.controlplane import REPO_ROOT
from tests.support.browser import BAR_BOXES, ROW_CELLS, Browser, element_box, ink_fraction

pytestmark = pytest.mark.integration


def test_demo_prints_a_chargeback_table_equal_to_the_sinks_totals_and_the_ground_truth(
    tmp_path: Path,
) -> None:
    out = tmp_path / "demo-out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "demo.run",
            "--seconds",
            "20",
            "--state",
            str(tmp_path / "state"),
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "ground truth" in result.stdout
    summary = json.loads((out / "chargeback.json").read_text())
    rows = summary["rows"]
    customers = {row["subject"] for row in rows}
    assert customers == {"acme", "globex", "initech"}
    assert {row["meter"] for row in rows} == {"gpu-seconds", "cpu-core-seconds", "memory-byte-seconds"}
    for row in rows:
        key = f"{row['subject']}|{row['meter']}|{row['gpu_model']}"
        assert Decimal(row["value"]) == Decimal(summary["ground_truth"][key]), key
    table_lines = [line for line in result.stdout.splitlines() if line.endswith("exact")]
    assert len(table_lines) == len(rows), "every row of the printed table matches the ground truth"
    assert_the_html_report_shows_the_tables_prices(out, rows)

    # The table is what the sink stored: its events, summed here, give the same totals.
    totals: dict[str, Decimal] = {}
    for event in json.loads((out / "sink-events.json").read_text()):
        model = event["dimensions"].get("gpu_model", "") if event["type"] == "gpu-seconds" else ""
        key = f"{event['subject']}|{event['type']}|{model}"
        totals[key] = totals.get(key, Decimal(0)) + Decimal(str(event["value"]))
    assert {f"{r['subject']}|{r['meter']}|{r['gpu_model']}": Decimal(r["value"]) for r in rows} == totals


def cents(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.01"), ROUND_HALF_UP)


def assert_the_html_report_shows_the_tables_prices(out: Path, rows: list[dict[str, str]]) -> None:
    """The demo's report and statements, opened in Chromium as a person would: the same customers
    and costs as the terminal table (one pricing file), and a chart that is drawn."""
    shots = Path(os.environ.get("KUBEMETER_SCREENSHOT_DIR", out))
    cost = {
        c: sum(Decimal(r["cost_usd"]) for r in rows if r["subject"] == c)
        for c in {r["subject"] for r in rows}
    }
    with Browser() as browser:
        browser.open(out / "report.html")
        rendered = {
            row[0]: Decimal(row[-1].replace(",", "")) for row in browser.evaluate(ROW_CELLS % "chargeback")
        }
        browser.screenshot(shots / "demo-report.png")
        chart = element_box(browser, "svg#timeline")
        bars = browser.evaluate(BAR_BOXES % "timeline")
        for customer in sorted(cost):
            browser.open(out / f"statement-{customer}.html")
            lines = browser.evaluate(ROW_CELLS % "statement")
            if customer == "acme":
                browser.screenshot(shots / "demo-statement-acme.png")
            expected = sum(cents(Decimal(r["cost_usd"])) for r in rows if r["subject"] == customer)
            assert Decimal(lines[-1][-1].replace(",", "")) == expected, customer
            assert all(Decimal(line[2].replace(",", "")) > 0 for line in lines[:-1]), (customer, lines)
    # The HTML table rounds float costs for display; the terminal table is decimal: a cent apart at most.
    expected = {**cost, "total": sum(cost.values())}
    assert set(rendered) == set(expected)
    assert all(abs(rendered[key] - expected[key]) <= Decimal("0.01") for key in expected), (
        rendered,
        expected,
    )
    assert rendered["total"] > 0
    assert len(bars) >= len(cost) and all(width > 0 and height > 0 for _, _, width, height in bars)
    assert ink_fraction(shots / "demo-report.png", chart) > 0.02, "the chart over time is drawn"
