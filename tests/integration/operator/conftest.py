"""The operator as a subprocess (``kubemeter operator --standalone``) against the real control plane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.controlplane import ControlPlane, free_port, wait_for

REPO_ROOT = Path(__file__).resolve().parents[3]


class OperatorProcess:
    """One ``kubemeter operator`` process; restartable, with its log kept for assertions."""

    def __init__(self, cluster: ControlPlane, log_dir: Path) -> None:
        self.cluster = cluster
        self.log_path = log_dir / "operator.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.liveness_port = 0

    def start(self) -> None:
        self.liveness_port = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.cluster.kubeconfig),
            "KUBEMETER_RESYNC_SECONDS": "5",
            "KUBEMETER_CLUSTER_NAME": "it",
            "KUBEMETER_GATEWAY_STATUS_TIMEOUT_SECONDS": "0.5",
        }
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "kubemeter_cli", "operator", "--standalone", "--metrics-port", "0"),
                *("--liveness-port", str(self.liveness_port)),
            ],
            env=env,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self.healthy, timeout_s=60, what="operator liveness endpoint")

    def healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"operator exited with {self.process.returncode}:\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2
            ) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, max_chars: int = 6000) -> str:
        return self.log_text()[-max_chars:]


@pytest.fixture(scope="session")
def crds(cluster: ControlPlane) -> None:
    cluster.kubectl("apply", "-f", str(REPO_ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")


# Stopped after test_operator.py (its only user): the chart's operator, installed later on the cluster
# (tests/e2e/test_helm_real_node.py), would otherwise reconcile the same Collectors beside it.
@pytest.fixture(scope="module")
def operator(
    cluster: ControlPlane, crds: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(cluster, tmp_path_factory.mktemp("operator"))
    process.start()
    try:
        yield process
    finally:
        process.stop()


def get(cluster: ControlPlane, *args: str) -> Any:
    """The object as JSON, or None when it does not exist."""
    result = cluster.kubectl("get", *args, "-o", "json", check=False)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout)


def condition(obj: Any, condition_type: str) -> dict[str, Any]:
    for item in ((obj or {}).get("status") or {}).get("conditions") or []:
        if item.get("type") == condition_type:
            return dict(item)
    return {}
