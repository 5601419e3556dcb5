"""Real processes and raw HTTP for the bad-input and slow-client tests: ``kubemeter sink`` as a child
process, bytes on a loopback socket (headers no HTTP library would send), peak memory from /proc."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tests.integration.output.harness import REPO_ROOT, free_port
from tests.support.billing_specs import SPEC_DIR


def memory_mib(pid: int) -> tuple[float, float]:
    """(resident now, peak resident) of a process, in MiB, from /proc/<pid>/status."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
    peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
    return rss_kib / 1024, peak_kib / 1024


def raw_request(port: int, request: bytes, *, timeout_s: float = 20.0) -> tuple[int, str]:
    """Send ``request`` as is to 127.0.0.1:``port``; the status and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as connection:
        connection.sendall(request)
        received = b""
        while True:
            try:
                chunk = connection.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
            head, _, body = received.partition(b"\r\n\r\n")
            match = re.search(rb"content-length:\s*(\d+)", head, re.IGNORECASE)
            if match and len(body) >= int(match.group(1)):
                break
    head, _, body = received.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    assert status_line.startswith("HTTP/1."), f"no HTTP answer: {received[:200]!r}"
    return int(status_line.split()[1]), body.decode("utf-8", "replace")


def wait_for(predicate: Any, *, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


class SinkProcess:
    """``kubemeter sink`` as a child process with spec validation, a token and fault injection."""

    def __init__(self, work_dir: Path, *, token: str | None = "sink-token", extra: list[str] | None = None):
        self.work_dir = work_dir
        work_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.token = token
        self.log_path = work_dir / "sink.log"
        command = [sys.executable, "-m", "kubemeter_cli", "sink", "--port", str(self.port)]
        command += ["--data-dir", str(work_dir / "data"), "--spec-dir", str(SPEC_DIR), "--enable-faults"]
        if token is not None:
            token_file = work_dir / "sink-token"
            token_file.write_text(token + "\n")
            command += ["--token-file", str(token_file)]
        self.command = command + (extra or [])
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def start(self) -> SinkProcess:
        log = self.log_path.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env
        )
        log.close()

        def healthy() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"kubemeter sink exited: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200
            return False

        wait_for(healthy, timeout_s=60, what="kubemeter sink to answer /healthz")
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def events(self) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = httpx.get(f"{self.url}/api/v1/usage/events", timeout=10).json()[
            "events"
        ]
        return events

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = httpx.get(f"{self.url}/_sink/stats", timeout=10).json()
        return stats

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


def metric_value(metrics_text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text format; fails when the sample is absent."""
    pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" ([0-9.e+-]+|NaN)$"
    match = re.search(pattern, metrics_text, re.MULTILINE)
    assert match, f"{name}{{{labels}}} not in /metrics"
    return float(match.group(1))


def cloudevent(event_id: str, **changes: Any) -> dict[str, Any]:
    """A valid event (time: now) with ``changes``; a change to ``...`` removes the attribute."""
    from datetime import UTC, datetime

    from kubemeter.events import format_rfc3339

    event: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id,
        "source": "kubemeter/bad-input",
        "type": "io.kubemeter.gpu.seconds",
        "subject": "team-a",
        "time": format_rfc3339(datetime.now(UTC).replace(microsecond=0)),
        "datacontenttype": "application/json",
        "data": {"value": 1.5, "unit": "s", "pod": "p"},
    }
    event.update(changes)
    return {key: value for key, value in event.items() if value is not ...}


def compact(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
