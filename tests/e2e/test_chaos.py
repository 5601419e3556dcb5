"""`make chaos` in its short form: every fault once, with pod churn going on, and afterwards the sink
holds exactly the ground truth: no event lost, none billed twice, no per-pod error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chaos.faults import FAULTS
from testbed.controlplane import REPO_ROOT, missing_binaries, tools_bin_dir
from tests.support.ci import unavailable

pytestmark = pytest.mark.integration


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in argv:
            found.append(f"{cmdline.parent.name}: {argv[:200]}")
    return found


def test_every_fault_leaves_the_sink_equal_to_the_ground_truth(tmp_path: Path) -> None:
    missing = missing_binaries(tools_bin_dir())
    if missing:
        unavailable(f"the local control plane needs {', '.join(missing)}; run tools/build.sh")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "chaos.run", "--short", "--state", str(tmp_path / "state"), "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(result.stdout[-12000:])
    assert (out / "latest.json").exists(), result.stdout[-6000:] + result.stderr[-4000:]
    report = json.loads((out / "latest.json").read_text())

    rows = {row["cohort"]: row for row in report["rows"]}
    assert set(rows) == {fault.name for fault in FAULTS} | {"long-lived"}
    inexact = {
        name: {k: row[k] for k in ("lost", "billed_twice", "wrong_value", "unexpected", "max_pod_error_s")}
        | {"examples": row["examples"], "pod_errors": row["pod_errors"][:3]}
        for name, row in rows.items()
        if not row["exact"]
    }
    assert not inexact, json.dumps(inexact, indent=1)
    assert report["setup_pods"]["exact"] and report["stray_events"] == 0
    sink = report["sink"]
    assert sink["storedEvents"] == sink["distinctEventIds"], "an event id stored twice"
    assert sink["specViolations"] == 0
    assert report["exact"] and result.returncode == 0, result.stderr[-4000:]

    # The faults really happened: agents were pushed back by the full volume, then drained.
    full = rows["full-volume"]
    assert full["evidence"]["gateway_refusals"] > 0
    assert sum(1 for spooled in full["evidence"]["agents_spooled"].values() if spooled) >= 2
    assert full["application_events"]["acknowledged"] > 0 and full["application_events"]["exact"]
    assert rows["node-delete"]["evidence"]["pods_ended"] > 0

    # Nothing it started outlives it.
    assert report["leftover_processes"] == []
    assert _processes_mentioning(str(tmp_path)) == []
