"""`make demo` runs start to finish, and its chargeback table is the sink's totals and the ground truth."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from testbed.controlplane import REPO_ROOT

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
    assert (out / "report.html").read_text().count("<svg") >= 1

    # The table is what the sink stored: its events, summed here, give the same totals.
    totals: dict[str, Decimal] = {}
    for event in json.loads((out / "sink-events.json").read_text()):
        model = event["dimensions"].get("gpu_model", "") if event["type"] == "gpu-seconds" else ""
        key = f"{event['subject']}|{event['type']}|{model}"
        totals[key] = totals.get(key, Decimal(0)) + Decimal(str(event["value"]))
    assert {f"{r['subject']}|{r['meter']}|{r['gpu_model']}": Decimal(r["value"]) for r in rows} == totals
