"""A real Kubernetes control plane as local processes: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok (fake nodes whose pods reach Running), all on loopback, on free ports.

Used by the pytest plugin (``tests/plugins/cluster.py``) and by people::

    python -m testbed.controlplane up --state .state/cluster --kubeconfig .kube/config
    python -m testbed.controlplane down --state .state/cluster

Binaries come from ``tools/build.sh`` (built from the wrapper Go modules under ``tools/``).
PersistentVolumeClaims of the default StorageClass ``standard`` are bound by a small provisioner that
runs here (see :class:`HostPathProvisioner`), because the control plane has no storage driver.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.pki import CertificateAuthority, KeyPair

REPO_ROOT = Path(__file__).resolve().parents[1]
ADMIN_USER = "kubemeter-test-admin"
STORAGE_CLASS = "standard"


class ControlPlaneError(RuntimeError):
    """The control plane could not start; the message names the component and its log."""


@dataclass(frozen=True)
class FakeNode:
    """A kwok node. ``internal_ip`` is a distinct loopback address so a stand-in kubelet can listen
    exactly where the node says its kubelet is."""

    name: str
    labels: dict[str, str]
    capacity: dict[str, str]
    internal_ip: str


def _gpu_node(index: int, product: str, memory_mib: int, extra: dict[str, str] | None = None) -> FakeNode:
    labels = {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": product,
        "nvidia.com/gpu.count": "8",
        "nvidia.com/gpu.memory": str(memory_mib),
        "node.kubernetes.io/instance-type": "p5.48xlarge",
    }
    capacity = {
        "cpu": "192",
        "memory": "2048Gi",
        "pods": "110",
        "ephemeral-storage": "3800Gi",
        "nvidia.com/gpu": "8",
    }
    capacity.update(extra or {})
    return FakeNode(f"kwok-gpu-{index}", labels, capacity, f"127.0.10.{index + 1}")


def default_nodes() -> list[FakeNode]:
    """Three 8-GPU nodes (two H100, one H200), one A100 node in MIG mixed mode, one CPU node."""
    mig_node = FakeNode(
        "kwok-mig-0",
        {
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
            "nvidia.com/gpu.count": "8",
            "nvidia.com/mig.strategy": "mixed",
            "node.kubernetes.io/instance-type": "p4de.24xlarge",
        },
        {
            "cpu": "96",
            "memory": "1152Gi",
            "pods": "110",
            "ephemeral-storage": "7600Gi",
            "nvidia.com/gpu": "6",
            "nvidia.com/mig-1g.10gb": "14",
        },
        "127.0.10.11",
    )
    cpu_node = FakeNode(
        "kwok-cpu-0",
        {"node.kubernetes.io/instance-type": "m7i.8xlarge"},
        {"cpu": "32", "memory": "128Gi", "pods": "110", "ephemeral-storage": "500Gi"},
        "127.0.10.21",
    )
    return [
        _gpu_node(0, "NVIDIA-H100-80GB-HBM3", 81559),
        _gpu_node(1, "NVIDIA-H100-80GB-HBM3", 81559),
        _gpu_node(2, "NVIDIA-H200", 143771),
        mig_node,
        cpu_node,
    ]


def tools_bin_dir() -> Path:
    """Where ``tools/build.sh`` links the binaries (``KUBEMETER_TOOLS_BIN`` overrides)."""
    if "KUBEMETER_TOOLS_BIN" in os.environ:
        return Path(os.environ["KUBEMETER_TOOLS_BIN"])
    out = subprocess.run(
        [str(REPO_ROOT / "tools" / "build.sh"), "--bin-dir"], check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip())


REQUIRED_BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "kubectl")


def missing_binaries(bin_dir: Path) -> list[str]:
    return [name for name in REQUIRED_BINARIES if not os.access(bin_dir / name, os.X_OK)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Component:
    name: str
    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] | None = None

    def start(self) -> None:
        log = self.log_path.open("ab")
        # A process group of its own: stop() can end the component and anything it forked.
        # The parent-death signal ends it even when the test process itself is SIGKILLed.
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout_s)
        self.process = None

    def log_tail(self, max_chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-max_chars:]
        except FileNotFoundError:
            return "(no log)"


@dataclass
class ControlPlane:
    state_dir: Path
    bin_dir: Path = field(default_factory=tools_bin_dir)
    nodes: list[FakeNode] = field(default_factory=default_nodes)
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    components: list[Component] = field(default_factory=list)
    api_port: int = 0
    kubelet_ports: dict[str, int] = field(default_factory=dict)
    _provisioner: HostPathProvisioner | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    ca: CertificateAuthority = field(init=False)
    kubelet_client: KeyPair = field(init=False)

    # ---- paths -----------------------------------------------------------------------------------
    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "admin.kubeconfig"

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def ca_file(self) -> Path:
        return self.state_dir / "pki" / "apiserver.crt"

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout_s: float = 120.0) -> None:
        missing = missing_binaries(self.bin_dir)
        if missing:
            raise ControlPlaneError(
                f"missing binaries in {self.bin_dir}: {', '.join(missing)}; build them with tools/build.sh"
            )
        started = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        (self.state_dir / "pki").mkdir(exist_ok=True)
        self._write_credentials()
        try:
            self._start_etcd(timeout_s)
            self._start_apiserver(timeout_s)
            self._write_kubeconfig(self.kubeconfig)
            self._start_controllers(timeout_s)
            self._create_nodes()
            self._start_kwok()
            self._wait_nodes_ready(timeout_s)
            self._create_storage_class()
            self._provisioner = HostPathProvisioner(self, self.state_dir / "volumes")
            self._provisioner.start()
        except BaseException:
            self.stop()
            raise
        self.timings_s["start"] = time.monotonic() - started

    def stop(self) -> None:
        if self._provisioner is not None:
            self._provisioner.stop()
            self._provisioner = None
        # Reverse order: the clients first, etcd last.
        for component in reversed(self.components):
            component.stop()

    def failed_components(self) -> list[Component]:
        return [c for c in self.components if not c.running()]

    def logs_report(self, max_chars: int = 3000) -> str:
        parts = [f"===== {c.name} ({c.log_path}) =====\n{c.log_tail(max_chars)}" for c in self.components]
        return "\n".join(parts)

    def rss_bytes(self) -> dict[str, int]:
        """Resident memory of each running component, from /proc (children included)."""
        result: dict[str, int] = {}
        for component in self.components:
            if component.process is None or component.process.poll() is not None:
                continue
            try:
                status = Path(f"/proc/{component.process.pid}/status").read_text()
            except FileNotFoundError:
                continue
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    result[component.name] = int(line.split()[1]) * 1024
        return result

    # ---- pieces ----------------------------------------------------------------------------------
    def _binary(self, name: str) -> str:
        return str(self.bin_dir / name)

    def _write_credentials(self) -> None:
        (self.state_dir / "tokens.csv").write_text(
            f'{self.token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n'
        )
        # Client certificates (the real node's kubelet) and the API server's kubelet client identity.
        self.ca = CertificateAuthority(self.state_dir / "pki").ensure()
        self.kubelet_client = self.ca.issue(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",)
        )
        sa_key = self.state_dir / "pki" / "sa.key"
        if not sa_key.exists():
            subprocess.run(
                ["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True
            )

    def _add(self, name: str, argv: list[str]) -> Component:
        component = Component(name, argv, self.logs_dir / f"{name}.log")
        self.components.append(component)
        component.start()
        return component

    def _wait(self, component: Component, ready: Any, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        started = time.monotonic()
        while time.monotonic() < deadline:
            if not component.running():
                raise ControlPlaneError(f"{component.name} exited while starting:\n{component.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                if ready():
                    self.timings_s[component.name] = time.monotonic() - started
                    return
            time.sleep(0.2)
        raise ControlPlaneError(
            f"{component.name} not ready after {timeout_s:.0f} s:\n{component.log_tail()}"
        )

    def _start_etcd(self, timeout_s: float) -> None:
        client, peer = free_port(), free_port()
        etcd = self._add(
            "etcd",
            [
                self._binary("etcd"),
                "--name=node0",
                f"--data-dir={self.state_dir / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{client}",
                f"--advertise-client-urls=http://127.0.0.1:{client}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=node0=http://127.0.0.1:{peer}",
                "--listen-metrics-urls=",
                # Test data is disposable; fsync would only slow every write.
                "--unsafe-no-fsync=true",
                f"--quota-backend-bytes={2 << 30}",
                "--auto-compaction-retention=1",
                "--log-level=warn",
            ],
        )
        self.etcd_url = f"http://127.0.0.1:{client}"

        def ready() -> bool:
            with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as response:
                return bool(json.load(response).get("health") == "true")

        self._wait(etcd, ready, timeout_s)

    def _start_apiserver(self, timeout_s: float) -> None:
        self.api_port = free_port()
        sa_key = self.state_dir / "pki" / "sa.key"
        apiserver = self._add(
            "kube-apiserver",
            [
                self._binary("kube-apiserver"),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.api_port}",
                f"--cert-dir={self.state_dir / 'pki'}",
                f"--token-auth-file={self.state_dir / 'tokens.csv'}",
                f"--client-ca-file={self.ca.cert}",
                f"--kubelet-client-certificate={self.kubelet_client.cert}",
                f"--kubelet-client-key={self.kubelet_client.key}",
                # The real node has no resolvable hostname: logs and exec go to its InternalIP.
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                "--authorization-mode=Node,RBAC",
                "--anonymous-auth=true",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={sa_key}",
                f"--service-account-signing-key-file={sa_key}",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--allow-privileged=true",
                # Without it, pods in a namespace created a moment ago race the default ServiceAccount.
                "--disable-admission-plugins=ServiceAccount",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                "--v=1",
            ],
        )
        context = self.ssl_context(verify=False)

        def ready() -> bool:
            request = urllib.request.Request(
                f"{self.api_url}/readyz", headers={"Authorization": f"Bearer {self.token}"}
            )
            with urllib.request.urlopen(request, timeout=3, context=context) as response:
                return bool(response.status == 200)

        self._wait(apiserver, ready, timeout_s)

    def ssl_context(self, verify: bool = True) -> ssl.SSLContext:
        if not verify:
            return ssl._create_unverified_context()
        return ssl.create_default_context(cafile=str(self.ca_file))

    def kubeconfig_text(self, token: str | None = None, user: str = ADMIN_USER) -> str:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "kubemeter-local",
            "clusters": [
                {
                    "name": "kubemeter-local",
                    "cluster": {"server": self.api_url, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": user, "user": {"token": token or self.token}}],
            "contexts": [
                {"name": "kubemeter-local", "context": {"cluster": "kubemeter-local", "user": user}}
            ],
        }
        return json.dumps(config, indent=2)

    def _write_kubeconfig(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.kubeconfig_text())
        path.chmod(0o600)

    def _start_controllers(self, timeout_s: float) -> None:
        common = [
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--authorization-always-allow-paths=/healthz,/readyz,/livez,/metrics",
            "--kube-api-qps=500",
            "--kube-api-burst=1000",
        ]
        kcm_port, scheduler_port = free_port(), free_port()
        kcm = self._add(
            "kube-controller-manager",
            [
                self._binary("kube-controller-manager"),
                *common,
                f"--secure-port={kcm_port}",
                f"--service-account-private-key-file={self.state_dir / 'pki' / 'sa.key'}",
                f"--root-ca-file={self.ca_file}",
                "--use-service-account-credentials=false",
                "--controllers=*",
                "--concurrent-gc-syncs=10",
            ],
        )
        scheduler = self._add(
            "kube-scheduler",
            [
                self._binary("kube-scheduler"),
                *common,
                f"--secure-port={scheduler_port}",
            ],
        )
        context = self.ssl_context(verify=False)
        for component, port in ((kcm, kcm_port), (scheduler, scheduler_port)):

            def ready(port: int = port) -> bool:
                with urllib.request.urlopen(
                    f"https://127.0.0.1:{port}/healthz", timeout=3, context=context
                ) as response:
                    return bool(response.status == 200)

            self._wait(component, ready, timeout_s)

    def _create_nodes(self) -> None:
        for node in self.nodes:
            self.kubelet_ports[node.name] = free_port()
            manifest = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": node.name,
                    "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                    "labels": {
                        "type": "kwok",
                        "kubernetes.io/hostname": node.name,
                        "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": "amd64",
                        "topology.kubernetes.io/zone": "local-a",
                        **node.labels,
                    },
                },
            }
            self.kubectl("apply", "-f", "-", input=json.dumps(manifest))
            status = {
                "status": {
                    "capacity": node.capacity,
                    "allocatable": node.capacity,
                    "addresses": [
                        {"type": "InternalIP", "address": node.internal_ip},
                        {"type": "Hostname", "address": node.name},
                    ],
                    "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_ports[node.name]}},
                }
            }
            self.kubectl(
                "patch", "node", node.name, "--subresource=status", "--type=merge", "-p", json.dumps(status)
            )

    def _start_kwok(self) -> None:
        stages = self.bin_dir / "kwok-stages.yaml"
        if not stages.exists():
            raise ControlPlaneError(f"{stages} is missing; run tools/build.sh")
        self._add(
            "kwok",
            [
                self._binary("kwok"),
                f"--kubeconfig={self.kubeconfig}",
                f"--config={stages}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                "--cidr=10.244.0.0/16",
                "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{free_port()}",
            ],
        )

    def _wait_nodes_ready(self, timeout_s: float) -> None:
        kwok = self.components[-1]

        def ready() -> bool:
            nodes = json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)["items"]
            ready_names = {
                n["metadata"]["name"]
                for n in nodes
                if any(
                    c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", [])
                )
            }
            return ready_names >= {node.name for node in self.nodes}

        self._wait(kwok, ready, timeout_s)

    def _create_storage_class(self) -> None:
        storage_class = {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": STORAGE_CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            "provisioner": HostPathProvisioner.NAME,
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
        }
        self.kubectl("apply", "-f", "-", input=json.dumps(storage_class))

    # ---- helpers ---------------------------------------------------------------------------------
    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
        timeout_s: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        argv = [self._binary("kubectl"), f"--kubeconfig={kubeconfig or self.kubeconfig}", *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout_s)
        if check and result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)


class HostPathProvisioner:
    """Binds PVCs of the ``standard`` class to new hostPath PVs under the state directory, and deletes
    released PVs. The real PV controller does the binding; this only supplies volumes, as a CSI
    external-provisioner would."""

    NAME = "kubemeter.io/test-hostpath"

    def __init__(self, plane: ControlPlane, root: Path) -> None:
        self.plane = plane
        self.root = root
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hostpath-provisioner", daemon=True)

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(subprocess.SubprocessError, ValueError, KeyError):
                self._reconcile()
            self._stop.wait(0.5)

    def _reconcile(self) -> None:
        claims = self.plane.get_json("pvc", "--all-namespaces")["items"]
        volumes = {v["metadata"]["name"]: v for v in self.plane.get_json("pv")["items"]}
        for claim in claims:
            meta, spec = claim["metadata"], claim["spec"]
            if claim.get("status", {}).get("phase") != "Pending" or spec.get("volumeName"):
                continue
            if spec.get("storageClassName", STORAGE_CLASS) != STORAGE_CLASS:
                continue
            name = f"pvc-{meta['uid']}"
            if name in volumes:
                continue
            path = self.root / name
            path.mkdir(parents=True, exist_ok=True)
            volume = {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": self.NAME}},
                "spec": {
                    "capacity": {"storage": spec["resources"]["requests"]["storage"]},
                    "accessModes": spec.get("accessModes", ["ReadWriteOnce"]),
                    "persistentVolumeReclaimPolicy": "Delete",
                    "storageClassName": STORAGE_CLASS,
                    "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
                    "claimRef": {"namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]},
                },
            }
            self.plane.kubectl("create", "-f", "-", input=json.dumps(volume), check=False)
        for name, volume in volumes.items():
            provisioned = volume["metadata"].get("annotations", {}).get("pv.kubernetes.io/provisioned-by")
            if provisioned == self.NAME and volume.get("status", {}).get("phase") in {"Released", "Failed"}:
                self.plane.kubectl("delete", "pv", name, "--wait=false", check=False)
                shutil.rmtree(self.root / name, ignore_errors=True)


def wait_for(
    predicate: Any, timeout_s: float = 60.0, interval_s: float = 0.25, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy; return it. Raise with ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (subprocess.CalledProcessError, KeyError, IndexError, ValueError) as error:
            last_error = error
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}; last error: {last_error}")


# ---- command line: make cluster-up / cluster-down --------------------------------------------------


def _up(state: Path, kubeconfig: Path, real_node: bool = False) -> int:
    if (state / "supervisor.pid").exists():
        print(f"a control plane already runs from {state}; run `make cluster-down` first", file=sys.stderr)
        return 1
    plane = ControlPlane(state)
    plane.start()
    plane._write_kubeconfig(kubeconfig)
    (state / "supervisor.pid").write_text(str(os.getpid()))
    node = None
    if real_node:
        from testbed.realnode import RealNode, unavailable_reason  # it imports this module

        reason = unavailable_reason(plane.bin_dir)
        if reason:
            print(f"no real node: {reason}", flush=True)
        else:
            # It holds the machine's real-node lock while the cluster is up (one real node at a time).
            node = RealNode(plane, state / "real-node", bin_dir=plane.bin_dir, lock_timeout_s=10)
            try:
                node.start()
                print(f"real node {node.name} Ready in {node.timings_s['start']:.1f} s", flush=True)
            except ControlPlaneError as error:
                print(f"no real node: {error}", file=sys.stderr, flush=True)
                node = None
    print(f"control plane up in {plane.timings_s['start']:.1f} s; kubeconfig: {kubeconfig}", flush=True)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    while not stopping.wait(1.0):
        if plane.failed_components():
            print(f"component exited:\n{plane.logs_report()}", file=sys.stderr)
            break
    try:
        if node is not None:
            node.stop()
            if node.leftovers_after_stop:
                print(f"the real node left behind: {node.leftovers_after_stop}", file=sys.stderr)
    finally:
        plane.stop()
        (state / "supervisor.pid").unlink(missing_ok=True)
    return 0


def _down(state: Path, kubeconfig: Path) -> int:
    pid_file = state / "supervisor.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            for _ in range(300):  # the real node's clean-up, then the control plane's
                os.kill(pid, 0)
                time.sleep(0.2)
    shutil.rmtree(state, ignore_errors=True)
    kubeconfig.unlink(missing_ok=True)
    print(f"control plane stopped; removed {state}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.controlplane")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--state", type=Path, default=REPO_ROOT / ".state" / "cluster")
    parser.add_argument("--kubeconfig", type=Path, default=REPO_ROOT / ".kube" / "config")
    parser.add_argument(
        "--real-node", action="store_true", help="up: also join the real kubelet node real-0 (root)"
    )
    args = parser.parse_args(argv)
    if args.action == "up":
        return _up(args.state.resolve(), args.kubeconfig.resolve(), real_node=args.real_node)
    return _down(args.state.resolve(), args.kubeconfig.resolve())


if __name__ == "__main__":
    raise SystemExit(main())
