"""End-to-end tests run against whichever cluster they are given.

- default: the local control plane (``cluster`` fixture: etcd, kube-apiserver, controllers, kwok);
- ``KUBEMETER_E2E_CLUSTER=kind``: an existing kind cluster (``kind create cluster --name kubemeter``
  on a machine with Docker); ``KUBEMETER_E2E_KUBECONFIG`` or ``kind get kubeconfig`` locates it.

Both give the tests a :class:`Kube`: a kubeconfig and a kubectl that talks to it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from testbed.controlplane import ControlPlane, tools_bin_dir
from tests.support.ci import unavailable


@dataclass(frozen=True)
class Kube:
    kubeconfig: Path
    kubectl_binary: str
    flavour: str

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        argv = [self.kubectl_binary, f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)


@pytest.fixture(scope="session")
def kube(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Kube:
    flavour = os.environ.get("KUBEMETER_E2E_CLUSTER", "local")
    if flavour == "local":
        plane: ControlPlane = request.getfixturevalue("cluster")
        return Kube(plane.kubeconfig, str(plane.bin_dir / "kubectl"), "local")
    if flavour == "kind":
        kubeconfig = os.environ.get("KUBEMETER_E2E_KUBECONFIG")
        if kubeconfig is None:
            kind = shutil.which("kind")
            if kind is None:
                unavailable("KUBEMETER_E2E_CLUSTER=kind but `kind` is not on PATH")
            name = os.environ.get("KUBEMETER_E2E_KIND_NAME", "kubemeter")
            text = subprocess.run(
                [kind, "get", "kubeconfig", "--name", name], check=True, capture_output=True, text=True
            ).stdout
            path = tmp_path_factory.mktemp("kind") / "kubeconfig"
            path.write_text(text)
            kubeconfig = str(path)
        kubectl = shutil.which("kubectl") or str(tools_bin_dir() / "kubectl")
        return Kube(Path(kubeconfig), kubectl, "kind")
    raise pytest.UsageError(f"KUBEMETER_E2E_CLUSTER={flavour!r}; use 'local' (default) or 'kind'")


@pytest.fixture
def e2e_namespace(kube: Kube) -> Iterator[str]:
    name = f"e2e-{uuid.uuid4().hex[:10]}"
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)
