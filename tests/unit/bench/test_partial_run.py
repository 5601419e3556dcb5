"""``python -m bench.run --only NAME`` replaces only the suites it ran in ``bench/results/latest.json``:
the other suites' figures, measured earlier, stay."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import run
from bench.table import markdown


def report(ran_at: str, suites: dict[str, list[dict[str, Any]]], named: bool = True) -> dict[str, Any]:
    return {
        "ran_at": ran_at,
        "machine": {"cpus": 2, "cpu_model": "x", "memory_gib": 1.0, "platform": "p", "python": "3"},
        # Files written before suites named their time lack ran_at there (and figures their suite).
        "suites": [
            {
                "suite": name,
                "about": "",
                "status": "ok",
                "seconds": 1.0,
                **({"ran_at": ran_at} if named else {}),
            }
            for name in suites
        ],
        "figures": [
            {**figure, **({"suite": name} if named else {})}
            for name, figures in suites.items()
            for figure in figures
        ],
    }


def figure(name: str, value: float) -> dict[str, Any]:
    return {"name": name, "value": value, "unit": "u", "baseline": "b"}


@pytest.mark.parametrize("named", [True, False], ids=["figures-name-their-suite", "older-file-by-group"])
def test_a_partial_run_replaces_its_own_suites_figures_and_keeps_the_others(named: bool) -> None:
    before = report(
        "2026-12-03T13:08:00+00:00",
        {
            "bench.bench_agent": [figure("agent/110-pods/cpu", 1.13), figure("agent/gone", 1)],
            "bench.bench_operator": [figure("operator/children", 0.3)],
        },
        named,
    )
    after = report("2026-12-03T18:30:00+00:00", {"bench.bench_agent": [figure("agent/110-pods/cpu", 0.8)]})

    merged = run.merge(before, after)

    values = {f["name"]: f["value"] for f in merged["figures"]}
    assert values == {"operator/children": 0.3, "agent/110-pods/cpu": 0.8}
    when = {s["suite"]: s["ran_at"] for s in merged["suites"]}
    assert when == {"bench.bench_operator": "2026-12-03T13:08:00+00:00", "bench.bench_agent": after["ran_at"]}
    assert merged["ran_at"] == after["ran_at"]


def test_run_with_only_writes_over_an_existing_output_without_wiping_other_suites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "latest.json"
    output.write_text(
        json.dumps(report("2026-12-03T13:08:00+00:00", {"bench.bench_peer": [figure("peer/x", 2)]}))
    )
    monkeypatch.setattr(run, "suites", lambda: ["bench.yardsticks", "bench.bench_peer"])

    class Yardsticks:
        ABOUT = "stand-in yardsticks"

        @staticmethod
        def run() -> list[dict[str, Any]]:
            return [figure("yardstick/fsync-rate", 700)]

    monkeypatch.setattr(run.importlib, "import_module", lambda name: Yardsticks)

    assert run.main(["--only", "yardsticks", "--output", str(output)]) == 0

    written = json.loads(output.read_text())
    assert {f["name"]: f["value"] for f in written["figures"]} == {"peer/x": 2, "yardstick/fsync-rate": 700}
    assert [s["suite"] for s in written["suites"]] == ["bench.bench_peer", "bench.yardsticks"]
    assert "bench_peer ok 1 s at 2026-12-03T13:08Z" in markdown(written)
