"""Run the real agent as a process against the local control plane, writing into a real SQLite file.

``python -m tests.integration.agent.agent_harness --events-db F <kubemeter agent args>`` is the agent
with one difference: its output is :class:`SqliteEventOutput` (every write is a committed SQLite
transaction, so "on disk when write returns" holds and a SIGKILL can be tested honestly).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from kubemeter.api.rendered import AgentConfig
from kubemeter.events import UsageEvent

REPO_ROOT = Path(__file__).resolve().parents[3]


class SqliteEventOutput:
    """An EventOutput that appends every written event (duplicates included) to a SQLite table."""

    def __init__(self, path: str | Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, id TEXT, body TEXT, pid INTEGER)"
        )

    async def write(self, events: Sequence[UsageEvent]) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "INSERT INTO events (id, body, pid) VALUES (?, ?, ?)",
                [(e.id, json.dumps(e.to_cloudevent()), os.getpid()) for e in events],
            )


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    db = sqlite3.connect(path)
    try:
        return [json.loads(body) for (body,) in db.execute("SELECT body FROM events ORDER BY seq")]
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


def exact(value: Any) -> Decimal:
    return Decimal(str(value))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def meter(name: str, uid: str, namespace: str, source: dict[str, Any], **spec: Any) -> dict[str, Any]:
    processors = spec.pop("processors", [])
    return {
        "name": name,
        "namespace": "kubemeter-system",
        "uid": uid,
        "pipeline": "default",
        "spec": {
            "eventType": name,
            "unit": spec.pop("unit", "unit-seconds"),
            "windowSeconds": spec.pop("windowSeconds", 10),
            "source": source,
            "pods": {"namespaces": [namespace]},
            **spec,
        },
        "processors": processors,
    }


class AgentProcess:
    """One ``kubemeter agent`` for one node, restartable, killable with SIGKILL."""

    def __init__(
        self,
        workdir: Path,
        node: str,
        kubeconfig: Path,
        meters: list[dict[str, Any]],
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.node = node
        self.kubeconfig = kubeconfig
        self.port = free_port()
        self.events_db = workdir / "events.sqlite"
        self.config_path = workdir / "agent.yaml"
        self.log_path = workdir / "agent.log"
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.write_config(meters)

    def write_config(self, meters: list[dict[str, Any]]) -> None:
        config = {
            "cluster": "test",
            "collector": "c",
            "namespace": "kubemeter-system",
            "meters": meters,
            "gatewayUrl": "http://127.0.0.1:1",
            "intervalSeconds": 1,
            "spoolDir": str(self.workdir / "spool"),
            "checkpointDir": str(self.workdir / "checkpoints"),
            "metricsPort": self.port,
        }
        AgentConfig.model_validate(config)  # fail here, not in the agent, on a bad test config
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(config))
        tmp.replace(self.config_path)  # atomic, as a ConfigMap update is

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.integration.agent.agent_harness",
                "--events-db",
                str(self.events_db),
                "--config",
                str(self.config_path),
                "--node-name",
                self.node,
                "--kubeconfig",
                str(self.kubeconfig),
            ],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        self.wait_healthy()

    def healthz(self) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as response:
                return int(response.status)
        except OSError:
            return 0

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as response:
            return str(response.read().decode())

    def wait_healthy(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"agent for {self.node} exited:\n{self.log_path.read_text()[-3000:]}")
            if self.healthz() == 200:
                return
            time.sleep(0.1)
        raise TimeoutError(f"agent for {self.node} not healthy:\n{self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def pods_held_as_running(self) -> set[str]:
        """Pods the agent's checkpoint still holds without a deletion (pods live at least 3 s, so
        every pod is in the checkpoint before it is deleted; finished pods are dropped from it)."""
        db = sqlite3.connect(self.workdir / "checkpoints" / "checkpoints.sqlite")
        try:
            rows = db.execute("SELECT uid, object, deleted_at_ms FROM pods").fetchall()
        finally:
            db.close()
        return {
            uid
            for uid, obj, deleted_at in rows
            if deleted_at is None and "deletionTimestamp" not in json.loads(obj)["metadata"]
        }

    def cursors_ms(self) -> dict[str, int]:
        """Each meter's checkpointed cursor: every window before it is written."""
        path = self.workdir / "checkpoints" / "checkpoints.sqlite"
        if not path.exists():
            return {}
        db = sqlite3.connect(path)
        try:
            return {meter: int(cursor) for meter, cursor in db.execute("SELECT meter, cursor_ms FROM meters")}
        except sqlite3.OperationalError:
            return {}
        finally:
            db.close()

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.events_db)


def main(argv: Sequence[str]) -> int:
    from kubemeter.agent import parse_args
    from kubemeter.agent.runtime import Agent

    parser = argparse.ArgumentParser()
    parser.add_argument("--events-db", required=True)
    own, rest = parser.parse_known_args(argv)
    args = parse_args(rest)
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("kubemeter.sources.informer").setLevel(logging.DEBUG)  # barriers, for failures
    if os.environ.get("KUBEMETER_TEST_FAKE_NVML"):
        # GPU tests without a GPU: NVML answers from the fake at the pynvml boundary.
        from tests.support.live_nvml import install_from_file

        install_from_file(os.environ["KUBEMETER_TEST_FAKE_NVML"])
    agent = Agent(
        args.config, args.node_name, lambda _config: SqliteEventOutput(own.events_db), args.kubeconfig
    )
    asyncio.run(agent.run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
