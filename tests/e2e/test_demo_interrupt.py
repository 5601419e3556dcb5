"""`make demo` stopped with Ctrl-C mid-run tears everything down: it says so, and no process is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.controlplane import REPO_ROOT, wait_for

pytestmark = pytest.mark.integration


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that name ``text`` (the demo's state directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in argv:
            found.append(f"{entry.name}: {argv[:200]}")
    return found


def logs_tail(state: Path, max_chars: int = 1500) -> str:
    """The end of each process log of the demo (which one did not stop, and why)."""
    return "\n".join(
        f"===== {path.name}\n{path.read_text(errors='replace')[-max_chars:]}"
        for path in sorted((state / "logs").glob("*.log"))
    )


def test_ctrl_c_mid_run_stops_every_process_and_exits_130_even_when_started_with_sigint_ignored(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        demo = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "demo.run",
                "--seconds",
                "60",
                "--state",
                str(state),
                "--out",
                str(tmp_path),
            ],
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            # Started the way a CI runner or `make demo &` in a script starts it: SIGINT ignored.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
        try:
            # Interrupt once the whole stack runs: agents are metering and workloads started.
            wait_for(lambda: "workloads for" in log.read_text(), timeout_s=300, what="the workloads to start")
            assert processes_mentioning(str(state)), "the demo's processes should be running now"
            demo.send_signal(signal.SIGINT)
            try:
                code = demo.wait(60)
            except subprocess.TimeoutExpired:
                tails = f"{log.read_text()[-3000:]}\n{logs_tail(state)}"
                pytest.fail(f"the demo did not exit 60 s after Ctrl-C:\n{tails}")
            assert code == 130
        finally:
            if demo.poll() is None:
                demo.kill()
    text = log.read_text()
    assert "interrupted; tearing down" in text and "stopped every process" in text, text[-3000:]
    deadline = time.monotonic() + 10
    while processes_mentioning(str(state)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_mentioning(str(state)) == []
