"""`kubemeter report` against a real `kubemeter sink` process: the events posted are the usage billed,
duplicates once, priced per GPU model, in every format, over any grouping and time range."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.controlplane import REPO_ROOT, free_port, wait_for
from tests.support.browser import BAR_BOXES, ROW_CELLS, Browser, element_box, ink_fraction

GIB_HOUR = 3600 * 2**30
H100, H200, A100 = "NVIDIA-H100-80GB-HBM3", "NVIDIA-H200", "NVIDIA-A100-SXM4-80GB"
PRICING = """currency: USD
prices:
  GPU-hours: 2.0
  core-hours: 0.05
  GiB-hours: 0.01
gpuModels:
  NVIDIA-H100-80GB-HBM3: 4.0
  NVIDIA-H200: 5.0
"""


def event(
    number: int,
    subject: str,
    event_type: str,
    unit: str,
    value: float,
    day: int,
    namespace: str,
    gpu_model: str | None = None,
    complete: bool = True,
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "value": value,
        "unit": unit,
        "window_start": f"2026-11-0{day}T10:00:00Z",
        "window_end": f"2026-11-0{day}T10:01:00Z",
        "namespace": namespace,
        "pod": f"pod-{number}",
        "node": "kwok-gpu-0",
        "complete": complete,
    }
    if gpu_model:
        data["gpu_model"] = gpu_model
    return {
        "specversion": "1.0",
        "id": f"evt-{number}",
        "source": "kubemeter/report-it",
        "type": event_type,
        "subject": subject,
        "time": f"2026-11-0{day}T10:01:00Z",
        "datacontenttype": "application/json",
        "data": data,
    }


EVENTS = [
    event(1, "team-a", "gpu-seconds", "gpu-seconds", 7200, 1, "research", H100),
    event(2, "team-a", "gpu-seconds", "gpu-seconds", 3600, 2, "research", H100),
    event(3, "team-a", "cpu-core-seconds", "core-seconds", 36000, 1, "research"),
    event(4, "team-a", "memory-byte-seconds", "byte-seconds", 4 * GIB_HOUR, 1, "research"),
    event(5, "team-b", "gpu-seconds", "gpu-seconds", 1800, 1, "inference", H200, complete=False),
    event(6, "team-b", "gpu-seconds", "gpu-seconds", 3600, 2, "inference", A100),
    event(7, "team-b", "cpu-core-seconds", "core-seconds", 7200, 2, "inference"),
    event(8, "team-c", "cpu-core-seconds", "core-seconds", 3600, 3, "web"),
]
# team-a: 3 H100 GPU-h x 4 + 10 core-h x 0.05 + 4 GiB-h x 0.01; team-b: 0.5 H200 GPU-h x 5 + 1 A100
# GPU-h at the GPU-hours price 2 + 2 core-h x 0.05; team-c: 1 core-h x 0.05
EXPECTED_COST = {"team-a": 12.54, "team-b": 4.6, "team-c": 0.05}


class SinkProcess:
    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir / "sink.log"
        argv = [sys.executable, "-m", "kubemeter_cli", "sink", "--host", "127.0.0.1"]
        argv += ["--port", str(self.port), "--data-dir", str(data_dir)]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self.healthy, timeout_s=30, what="kubemeter sink /healthz")

    def healthy(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"kubemeter sink exited:\n{self.log.read_text()}")
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def post(self, events: list[dict[str, Any]]) -> None:
        request = urllib.request.Request(
            f"{self.url}/api/v1/events",
            data=json.dumps(events).encode(),
            headers={"Content-Type": "application/cloudevents-batch+json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 204

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=15)


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SinkProcess]:
    process = SinkProcess(tmp_path_factory.mktemp("sink"))
    try:
        process.post(EVENTS)
        process.post(EVENTS[:2])  # a redelivery: deduplicated by the sink, billed once
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def pricing_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pricing") / "prices.yaml"
    path.write_text(PRICING)
    return path


def report(sink: SinkProcess, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "kubemeter_cli", "report", "--url", sink.url, *args]
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)


def report_json(sink: SinkProcess, *args: str) -> dict[str, Any]:
    result = report(sink, "--format", "json", *args)
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def test_cost_per_customer_matches_the_events_posted(sink: SinkProcess, pricing_file: Path) -> None:
    document = report_json(sink, "--pricing", str(pricing_file))
    costs = {row["subject"]: row["cost"] for row in document["rows"]}
    assert costs == pytest.approx(EXPECTED_COST)
    assert document["total"]["cost"] == pytest.approx(sum(EXPECTED_COST.values()))
    team_a = next(row for row in document["rows"] if row["subject"] == "team-a")
    assert team_a["quantities"]["gpu-seconds"] == {"unit": "GPU-hours", "value": 3.0}
    assert team_a["events"] == 4  # the redelivered events counted once
    assert document["total"]["incompleteEvents"] == 1


def test_table_shows_gpu_cpu_and_memory_hours_per_team(sink: SinkProcess, pricing_file: Path) -> None:
    result = report(sink, "--pricing", str(pricing_file))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["subject", "GPU-hours", "core-hours", "GiB-hours", "cost", "(USD)"]
    assert lines[2].split() == ["team-a", "3.000", "10.000", "4.000", "12.54"]
    assert lines[6].split() == ["total", "4.500", "13.000", "4.000", "17.19"]
    assert "complete=false" in result.stdout


def test_flags_override_the_file_and_group_by_gpu_model(sink: SinkProcess, pricing_file: Path) -> None:
    document = report_json(
        sink, "--pricing", str(pricing_file), "--gpu-price", f"{A100}=3", "--group-by", "gpu_model"
    )
    costs = {row["gpu_model"]: row["costs"]["gpu-seconds"] for row in document["rows"]}
    assert costs == pytest.approx({H100: 12.0, H200: 2.5, A100: 3.0, "(none)": 0.0})


def test_grouped_by_namespace_and_day_within_a_time_range(sink: SinkProcess) -> None:
    document = report_json(
        sink, "--group-by", "namespace,day", "--from", "2026-11-02", "--to", "2026-11-03T00:00:00Z"
    )
    keys = {(row["namespace"], row["day"]) for row in document["rows"]}
    assert keys == {("research", "2026-11-02"), ("inference", "2026-11-02")}
    assert document["total"]["quantities"]["cpu-core-seconds"]["value"] == 2.0


def test_csv_and_html_files(sink: SinkProcess, pricing_file: Path, tmp_path: Path) -> None:
    csv_path, html_path = tmp_path / "report.csv", tmp_path / "report.html"
    assert (
        report(sink, "--pricing", str(pricing_file), "--format", "csv", "-o", str(csv_path)).returncode == 0
    )
    rows = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert float(rows[-1]["cost (USD)"]) == pytest.approx(17.19)
    assert (
        report(sink, "--pricing", str(pricing_file), "--format", "html", "-o", str(html_path)).returncode == 0
    )
    page = html_path.read_text()
    assert "<svg" in page and "<script" not in page and "team-b" in page


def test_unpriced_usage_is_named_and_a_dead_api_is_explained(sink: SinkProcess) -> None:
    result = report(sink, "--price", "core-hours=0.05")
    assert result.returncode == 0
    assert "no price for: gpu-seconds (GPU-hours, NVIDIA-A100-SXM4-80GB)" in result.stdout
    dead = subprocess.run(
        [sys.executable, "-m", "kubemeter_cli", "report", "--url", f"http://127.0.0.1:{free_port()}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dead.returncode == 1 and "check --url" in dead.stderr


# -- what a person sees: the HTML report and a statement, rendered by a real Chromium --------------


def test_html_report_renders_costs_per_customer_and_a_chart_over_time_in_chromium(
    sink: SinkProcess, pricing_file: Path, tmp_path: Path
) -> None:
    page_path = tmp_path / "report.html"
    result = report(sink, "--pricing", str(pricing_file), "--format", "html", "-o", str(page_path))
    assert result.returncode == 0, result.stderr
    with Browser() as browser:
        browser.open(page_path)
        rows = browser.evaluate(ROW_CELLS % "chargeback")
        shot = Path(os.environ.get("KUBEMETER_SCREENSHOT_DIR", tmp_path)) / "report-sink.png"
        browser.screenshot(shot)
        chart = element_box(browser, "svg#timeline")
        bars = browser.evaluate(BAR_BOXES % "timeline")
        breakdown_bars = browser.evaluate(BAR_BOXES % "breakdown")
        text = browser.evaluate("document.body.innerText")
    rendered_cost = {row[0]: float(row[-1].replace(",", "")) for row in rows}
    assert rendered_cost == pytest.approx({**EXPECTED_COST, "total": sum(EXPECTED_COST.values())}, abs=0.005)
    # One column segment per (customer, hour with usage): team-a on days 1 and 2, team-b on days 1
    # and 2, team-c on day 3, each at 10:00 UTC.
    assert len(bars) == 5 and all(w > 0 and h > 0 for _, _, w, h in bars)
    assert chart[2] > 400 and chart[3] > 200
    assert ink_fraction(shot, chart) > 0.02, "the chart's area is drawn, not blank"
    assert len(breakdown_bars) >= 4  # GPU per model, CPU, memory; stacked by customer
    assert "Incomplete usage" in text and "1 event(s) are flagged complete=false" in text


def test_statement_for_one_customer_renders_its_lines_and_total_in_chromium(
    sink: SinkProcess, pricing_file: Path, tmp_path: Path
) -> None:
    page_path = tmp_path / "statement.html"
    argv = ["--pricing", str(pricing_file), "--customer", "team-a", "--month", "2026-11"]
    result = report(sink, *argv, "--format", "html", "-o", str(page_path))
    assert result.returncode == 0, result.stderr
    with Browser() as browser:
        browser.open(page_path)
        rows = browser.evaluate(ROW_CELLS % "statement")
    assert [row[:2] for row in rows[:-1]] == [
        ["cpu-core-seconds", "-"],
        ["gpu-seconds", H100],
        ["memory-byte-seconds", "-"],
    ]
    assert [row[-1] for row in rows] == ["0.50", "12.00", "0.04", "12.54"]  # 10 core-h, 3 H100-h, 4 GiB-h
    csv_result = report(sink, *argv, "--format", "csv")
    assert csv_result.returncode == 0, csv_result.stderr
    assert csv_result.stdout.splitlines()[-1].split(",")[:6] == ["total", "", "", "", "", "12.54"]
