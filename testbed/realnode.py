"""A real node beside the kwok nodes: containerd 2.4 + runc + a kubelet of the API server's version,
joined to a :class:`~testbed.controlplane.ControlPlane` as ``real-0``, running real containers.

    node = RealNode(plane, state_dir)
    node.start()                          # Ready in about a second once built
    node.import_image(busybox_image(path))
    plane.kubectl("apply", "-f", "-", input=json.dumps(on_real_node(pod)))
    node.stop()                           # leaves no process, mount, cgroup, sysctl or file behind

The settings, and the failure each one fixes on this machine kind (cgroup v1 hybrid, root without
CAP_SYS_RESOURCE, no ``dummy`` link type), are in docs/testing.md. In short:

* networking stays on loopback: the CNI gives each pod a ``tap`` device inside the pod's own network
  namespace with an address from 127.1.0.0/16 and no route, bridge or veth on the host, so there is no
  pod-to-pod or pod-to-Service traffic; pods that talk use ``hostNetwork: true`` and 127.0.0.1;
* the node is tainted ``kubemeter.io/real-node=true:NoSchedule`` so pods meant for the kwok nodes never
  land here; :func:`on_real_node` adds the node selector and the toleration;
* there is no registry: images are OCI archives (:mod:`testbed.images`) imported with
  :meth:`RealNode.import_image` and run with ``imagePullPolicy: Never``;
* the kubelet's root is the standard ``/var/lib/kubelet`` (so the PodResources socket is where a chart
  expects it), so one real node runs per machine at a time: :class:`MachineLock` serialises them.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from testbed.controlplane import Component, ControlPlane, ControlPlaneError, free_port, tools_bin_dir
from testbed.images import ImageArchive, busybox_image, single_binary_image

NAME = "real-0"
TAINT_KEY = "kubemeter.io/real-node"
LABEL = {TAINT_KEY: "true"}
TOLERATION = {"key": TAINT_KEY, "operator": "Equal", "value": "true", "effect": "NoSchedule"}
UNINITIALIZED_TAINT = "node.cloudprovider.kubernetes.io/uninitialized"
NODE_SELECTOR = {"kubernetes.io/hostname": NAME}
BUSYBOX_IMAGE = "kubemeter.local/busybox:1"
PAUSE_IMAGE = "kubemeter.local/pause:1"

KUBELET_ROOT = Path("/var/lib/kubelet")
POD_RESOURCES_SOCKET = KUBELET_ROOT / "pod-resources" / "kubelet.sock"
RUN_DIR = Path("/run/kubemeter-realnode")  # containerd's state, its socket, netns mounts, the record
DATA_DIR = Path("/var/lib/kubemeter-realnode")  # containerd's root (images, snapshots), CNI, pod logs
CONTAINERD_SOCKET = RUN_DIR / "containerd.sock"
KUBELET_PORT = 10250
RUNC = Path("/usr/sbin/runc")  # Debian's runc
# Paths outside our own directories that the kubelet, containerd or the CNI plugins create.
FOREIGN_PATHS = (
    Path("/var/log/containers"),
    Path("/var/lib/cni"),
    Path("/run/containerd"),
    Path("/run/netns"),
)
# What the kubelet writes (pkg/kubelet/cm: setupKernelTunables) and its values; restored on stop.
KUBELET_SYSCTLS = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}
OWN_BINARIES = frozenset({"kubelet", "containerd", "containerd-shim-runc-v2", "runc", "pause", "ctr"})
REQUIRED_BINARIES = (
    "kubelet",
    "containerd",
    "ctr",
    "containerd-shim-runc-v2",
    "loopback",
    "tap",
    "host-local",
    "pause",
)
MNT_DETACH = 2


class RealNodeError(ControlPlaneError):
    """The real node could not start or stop cleanly; the message names the part and its log."""


def on_real_node(manifest: dict[str, Any]) -> dict[str, Any]:
    """A Pod (or a workload's pod template) bound for ``real-0``: node selector, the taint's
    toleration and ``imagePullPolicy: Never`` on every container (there is no registry)."""
    spec = manifest["spec"]
    if manifest.get("kind") != "Pod":
        spec = spec["template"]["spec"]
    spec.setdefault("nodeSelector", {}).update(NODE_SELECTOR)
    tolerations = spec.setdefault("tolerations", [])
    if TOLERATION not in tolerations:
        tolerations.append(dict(TOLERATION))
    for container in [*spec.get("initContainers", []), *spec["containers"]]:
        container.setdefault("imagePullPolicy", "Never")
    return manifest


def unavailable_reason(bin_dir: Path) -> str | None:
    """Why a real node cannot run on this machine, or None."""
    if os.geteuid() != 0:
        return "the real node needs root (containerd, runc and the kubelet mount, create cgroups and netns)"
    missing = [name for name in REQUIRED_BINARIES if not os.access(bin_dir / name, os.X_OK)]
    if missing:
        return f"real-node binaries missing in {bin_dir}: {', '.join(missing)}; run tools/build.sh"
    if not os.access(RUNC, os.X_OK):
        return f"{RUNC} is missing; install Debian's runc (apt-get install runc)"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing; the CNI tap plugin needs it"
    return None


# ---- the machine-wide lock ------------------------------------------------------------------------


class MachineLock:
    """One real node per machine: an abstract unix socket bound for the node's lifetime. The kernel
    frees it when the process dies, so a killed run never leaves a stale lock, and nothing is on disk."""

    ADDRESS = "\0kubemeter-testbed-realnode"

    def __init__(self) -> None:
        self._socket: socket.socket | None = None

    def acquire(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(self.ADDRESS)
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise RealNodeError(
                        f"another real node has run on this machine for over {timeout_s:.0f} s "
                        "(one at a time: the kubelet's root is /var/lib/kubelet)"
                    ) from None
                time.sleep(1.0)
                continue
            self._socket = sock
            return

    def release(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


# ---- what the host looks like, to prove clean-up -------------------------------------------------


def _cgroup_mounts() -> list[Path]:
    mounts = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mountpoint, fstype, *_ = line.split()
        if fstype in {"cgroup", "cgroup2"}:
            mounts.append(Path(mountpoint))
    return mounts


def _mountpoints() -> list[str]:
    # Field 5 of mountinfo is the mount point (octal escapes for spaces; none of ours have any).
    return [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]


def _sysctl_tree() -> dict[str, str]:
    """Every readable sysctl the kubelet, containerd or the CNI could touch in the host namespace."""
    volatile = ("kernel/random/", "kernel/ns_last_pid", "kernel/pty/nr", "fs/dentry-state", "fs/file-nr",
                "fs/inode-nr", "fs/inode-state", "kernel/tainted", "vm/stat_refresh", "fs/quota/",
                "net/netfilter/nf_conntrack_count", "kernel/sched_domain/")  # fmt: skip
    values: dict[str, str] = {}
    root = Path("/proc/sys")
    for top in ("vm", "kernel", "fs", "net/core", "net/ipv4", "net/ipv6/conf/all", "net/ipv6/conf/default"):
        for dirpath, dirnames, filenames in os.walk(root / top):
            dirnames[:] = [d for d in dirnames if not (top == "net/ipv4" and d in {"conf", "neigh"})]
            for name in filenames:
                key = str(Path(dirpath, name).relative_to(root))
                if key.startswith(volatile):
                    continue
                with contextlib.suppress(OSError):
                    values[key] = Path(dirpath, name).read_text()
    return values


def _pids_of_node() -> dict[int, str]:
    """Processes that belong to a real node: our binaries, or anything inside a kubepods cgroup."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            exe = os.path.basename(os.readlink(entry / "exe"))
            cgroups = (entry / "cgroup").read_text()
        except OSError:
            continue
        if exe in OWN_BINARIES or "/kubepods" in cgroups:
            found[int(entry.name)] = exe
    return found


@dataclass
class HostState:
    """The parts of the host a node could leave changed. Other work shares the machine (it mounts,
    makes cgroups and links of its own), so only what a node could have made counts: mounts of the
    node's kinds or under its directories, cgroups and links of the names it uses."""

    mounts: set[str]
    cgroups: set[str]
    sysctls: dict[str, str]
    paths: dict[str, bool]
    links: set[str]

    @classmethod
    def capture(cls) -> HostState:
        roots = tuple(str(p) for p in (KUBELET_ROOT, RUN_DIR, DATA_DIR, *FOREIGN_PATHS))
        mounts = set()
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            mountpoint, fstype = fields[4], fields[fields.index("-") + 1]
            if fstype in {"overlay", "nsfs", "shm"} or mountpoint.startswith(roots):
                mounts.add(f"{mountpoint} ({fstype})")
        cgroups = set()
        for mount in _cgroup_mounts():
            for dirpath, _, _ in os.walk(mount):
                if "kubepods" in dirpath or "k8s.io" in dirpath:
                    cgroups.add(dirpath)
        links = {
            link for link in os.listdir("/sys/class/net") if link.startswith(("tap", "veth", "cni", "eth"))
        }
        paths = {path: Path(path).exists() for path in roots}
        return cls(mounts, cgroups, _sysctl_tree(), paths, links)

    def leftovers(self, baseline: HostState, pids: dict[int, str]) -> list[str]:
        """What differs from ``baseline`` (new mounts, cgroups, links; changed sysctls and paths) and
        the node processes in ``pids``; empty when the host is as it was."""
        found = [f"process {pid} ({exe})" for pid, exe in sorted(pids.items())]
        found += [f"mount {m}" for m in sorted(self.mounts - baseline.mounts)]
        found += [f"cgroup {c}" for c in sorted(self.cgroups - baseline.cgroups)]
        found += [f"network link {link}" for link in sorted(self.links - baseline.links)]
        found += [
            f"sysctl {key}: {baseline.sysctls[key].strip()} -> {value.strip()}"
            for key, value in sorted(self.sysctls.items())
            if key in baseline.sysctls and baseline.sysctls[key] != value
        ]
        found += [
            f"path {path} {'created' if exists else 'removed'}"
            for path, exists in sorted(self.paths.items())
            if baseline.paths.get(path) != exists
        ]
        return found


# ---- the node -------------------------------------------------------------------------------------


def _read_sysctl(name: str) -> str:
    return Path("/proc/sys", name).read_text().strip()


def _umount(path: str) -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.umount2(path.encode(), MNT_DETACH) != 0:
        error = ctypes.get_errno()
        if error not in (22, 2):  # EINVAL: not a mount point (any more); ENOENT: gone
            raise OSError(error, f"umount {path}: {os.strerror(error)}")


@dataclass
class RealNode:
    plane: ControlPlane
    state_dir: Path
    bin_dir: Path = field(default_factory=tools_bin_dir)
    name: str = NAME
    lock_timeout_s: float = 900.0
    max_pods: int = 20  # the kubelet's own default is 110 (bench/bench_agent.py runs that many)
    timings_s: dict[str, float] = field(default_factory=dict)
    baseline: HostState | None = None
    leftovers_after_stop: list[str] = field(default_factory=list)
    _lock: MachineLock = field(default_factory=MachineLock)
    _components: list[Component] = field(default_factory=list)

    # ---- paths and endpoints ---------------------------------------------------------------------
    @property
    def kubelet_url(self) -> str:
        return f"https://127.0.0.1:{KUBELET_PORT}"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def cni_bin_dir(self) -> Path:
        return (self.bin_dir / "tap").resolve().parent

    def kubelet_ssl_context(self) -> ssl.SSLContext:
        """Verifies the kubelet's serving certificate (signed by the testbed CA for 127.0.0.1)."""
        return ssl.create_default_context(cafile=str(self.plane.ca.cert))

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout_s: float = 120.0) -> None:
        reason = unavailable_reason(self.bin_dir)
        if reason:
            raise RealNodeError(reason)
        started = time.monotonic()
        self._lock.acquire(self.lock_timeout_s)
        self.timings_s["lock_wait"] = time.monotonic() - started
        try:
            self._recover_stale()
            if self.baseline is None:
                self.baseline = HostState.capture()
            self._record()
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self.logs_dir.mkdir(exist_ok=True)
            self._start_containerd(timeout_s)
            self._import_base_images()
            self._start_kubelet(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.timings_s["start"] = time.monotonic() - started - self.timings_s["lock_wait"]

    def stop(self) -> None:
        """Stop the kubelet, every pod and containerd; undo every mount, cgroup, sysctl and directory
        the node made; delete the Node object. Safe to call twice."""
        started = time.monotonic()
        try:
            if self._components:
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    self.plane.kubectl(
                        "delete",
                        "node",
                        self.name,
                        "--wait=false",
                        "--request-timeout=5s",
                        check=False,
                        timeout_s=10,
                    )
            record = self._read_record()
            if record is not None:
                self._clean(record)
            # Checked before the lock goes: the next node on this machine may start right after.
            self.leftovers_after_stop = self.leftovers()
        finally:
            self._components.clear()
            self._lock.release()
        self.timings_s["stop"] = time.monotonic() - started

    def leftovers(self) -> list[str]:
        """Whatever the node left on the host compared with before its first start (see
        :class:`HostState`); empty after a clean :meth:`stop`."""
        if self.baseline is None:
            return []
        return HostState.capture().leftovers(self.baseline, _pids_of_node())

    def failed_components(self) -> list[Component]:
        return [c for c in self._components if not c.running()]

    def logs_report(self, max_chars: int = 3000) -> str:
        return "\n".join(
            f"===== {c.name} ({c.log_path}) =====\n{c.log_tail(max_chars)}" for c in self._components
        )

    def rss_bytes(self) -> dict[str, int]:
        """Resident memory of the kubelet, containerd and each shim, from /proc."""
        result: dict[str, int] = {}
        for pid, exe in _pids_of_node().items():
            if exe not in {"kubelet", "containerd", "containerd-shim-runc-v2"}:
                continue
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        key = exe if exe != "containerd-shim-runc-v2" else f"shim-{pid}"
                        result[key] = int(line.split()[1]) * 1024
        return result

    # ---- images ----------------------------------------------------------------------------------
    def ctr(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bin_dir / "ctr"), f"--address={CONTAINERD_SOCKET}", "--namespace=k8s.io", *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        if result.returncode != 0:
            raise RealNodeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def import_image(self, archive: ImageArchive | Path) -> str:
        """Import an OCI image archive into the node's containerd (the CRI namespace ``k8s.io``) and
        return the image name pods refer to (with ``imagePullPolicy: Never``)."""
        path = archive.path if isinstance(archive, ImageArchive) else archive
        started = time.monotonic()
        out = self.ctr("images", "import", "--local", str(path)).stdout
        names = self.ctr("images", "ls", "-q").stdout.split()
        imported = archive.name if isinstance(archive, ImageArchive) else None
        if imported is not None and imported not in names:
            raise RealNodeError(
                f"{path}: {imported} not among the node's images after import: {names}; {out}"
            )
        self.timings_s[f"import {path.name}"] = time.monotonic() - started
        return imported or out.split()[-1]

    def images(self) -> list[str]:
        return self.ctr("images", "ls", "-q").stdout.split()

    def _import_base_images(self) -> None:
        images = self.state_dir / "images"
        self.import_image(
            single_binary_image(
                images / "pause.tar", PAUSE_IMAGE, self.bin_dir / "pause", workdir=self.state_dir
            )
        )
        self.import_image(busybox_image(images / "busybox.tar", BUSYBOX_IMAGE, workdir=self.state_dir))

    # ---- containerd ------------------------------------------------------------------------------
    def _start_containerd(self, timeout_s: float) -> None:
        cni_conf = DATA_DIR / "cni" / "net.d"
        cni_conf.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-kubemeter-tap.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "kubemeter-loopback",
                    "plugins": [
                        {
                            # A tap device inside the pod's netns gives eth0 an address; without a
                            # carrier, bridge, veth or route nothing leaves the pod (loopback rule).
                            "type": "tap",
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": "127.1.0.0/16", "rangeStart": "127.1.0.10"}]],
                                "dataDir": str(DATA_DIR / "cni" / "ipam"),
                            },
                        }
                    ],
                },
                indent=2,
            )
        )
        config = RUN_DIR / "containerd.toml"
        config.write_text(self._containerd_config(cni_conf))
        shim_dir = str((self.bin_dir / "containerd-shim-runc-v2").resolve().parent)
        env = {**os.environ, "PATH": f"{shim_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}
        containerd = self._add(
            "containerd", [str(self.bin_dir / "containerd"), f"--config={config}", "--log-level=warn"], env
        )
        begun = time.monotonic()
        self._wait(
            containerd, lambda: CONTAINERD_SOCKET.exists() and bool(self.ctr("version").stdout), timeout_s
        )
        self.timings_s["containerd"] = time.monotonic() - begun

    def _containerd_config(self, cni_conf: Path) -> str:
        runtime = "plugins.'io.containerd.cri.v1.runtime'"
        return f"""version = 3
root = "{DATA_DIR / "containerd"}"
state = "{RUN_DIR / "containerd"}"
# Only what the CRI needs; NRI would create /var/run/nri, the others need kernel features.
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.erofs",
  "io.containerd.snapshotter.v1.blockfile", "io.containerd.nri.v1.nri",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{CONTAINERD_SOCKET}"

[ttrpc]
  address = "{CONTAINERD_SOCKET}.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins.'io.containerd.internal.v1.opt']
  path = "{DATA_DIR / "opt"}"

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{PAUSE_IMAGE}"

[{runtime}]
  enable_selinux = false
  disable_apparmor = true
  # No CAP_SYS_RESOURCE here: runc may not lower oom_score_adj below the parent's.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [{runtime}.cni]
    bin_dirs = ["{self.cni_bin_dir}"]
    conf_dir = "{cni_conf}"
  [{runtime}.containerd]
    default_runtime_name = "runc"
    [{runtime}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{runtime}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{RUNC}"
"""

    # ---- kubelet ---------------------------------------------------------------------------------
    def _start_kubelet(self, timeout_s: float) -> None:
        pki = self.state_dir / "pki"
        ca = self.plane.ca
        client = ca.issue(f"kubelet-{self.name}-client", f"system:node:{self.name}", ("system:nodes",))
        serving = ca.issue(
            f"kubelet-{self.name}-serving", self.name, ip_sans=("127.0.0.1",), dns_sans=(self.name,)
        )
        pki.mkdir(parents=True, exist_ok=True)
        kubeconfig = self.state_dir / "kubelet.kubeconfig"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "node",
                    "clusters": [
                        {
                            "name": "local",
                            "cluster": {
                                "server": self.plane.api_url,
                                "certificate-authority": str(self.plane.ca_file),
                            },
                        }
                    ],
                    "users": [
                        {
                            "name": "node",
                            "user": {"client-certificate": str(client.cert), "client-key": str(client.key)},
                        }
                    ],
                    "contexts": [{"name": "node", "context": {"cluster": "local", "user": "node"}}],
                }
            )
        )
        kubeconfig.chmod(0o600)
        config = self.state_dir / "kubelet.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    "address": "127.0.0.1",
                    "port": KUBELET_PORT,
                    "readOnlyPort": 0,
                    "healthzBindAddress": "127.0.0.1",
                    "healthzPort": free_port(),
                    "tlsCertFile": str(serving.cert),
                    "tlsPrivateKeyFile": str(serving.key),
                    "serverTLSBootstrap": False,
                    "rotateCertificates": False,
                    "authentication": {
                        "anonymous": {"enabled": False},
                        "webhook": {"enabled": True},
                        "x509": {"clientCAFile": str(ca.cert)},
                    },
                    "authorization": {"mode": "Webhook"},
                    "cgroupDriver": "cgroupfs",
                    # This machine kind mounts cgroup v1 (with v2 at /sys/fs/cgroup/unified).
                    "failCgroupV1": False,
                    "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
                    "clusterDNS": [],
                    "clusterDomain": "cluster.local",
                    "maxPods": self.max_pods,
                    "podLogsDir": str(DATA_DIR / "pod-logs"),
                    # Fits a shared 24 GiB machine; imported images must never be collected (no registry).
                    "evictionHard": {
                        "memory.available": "100Mi",
                        "nodefs.available": "1%",
                        "imagefs.available": "1%",
                        "nodefs.inodesFree": "1%",
                    },
                    "imageGCHighThresholdPercent": 100,
                    "imageGCLowThresholdPercent": 99,
                    "registerWithTaints": [{"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}],
                    "failSwapOn": False,
                    "staticPodPath": "",
                }
            )
        )
        kubelet = self._add(
            "kubelet",
            [
                str(self.bin_dir / "kubelet"),
                f"--config={config}",
                f"--kubeconfig={kubeconfig}",
                f"--hostname-override={self.name}",
                f"--root-dir={KUBELET_ROOT}",
                # The kubelet refuses a loopback --node-ip and would advertise the host's own address,
                # where it does not listen. As with a cloud provider, it then leaves the addresses to
                # "the cloud": this fixture sets them (InternalIP 127.0.0.1) and lifts the taint.
                "--cloud-provider=external",
                f"--node-labels={','.join(f'{k}={v}' for k, v in LABEL.items())}",
                "--v=1",
            ],
        )
        begun = time.monotonic()

        def registered() -> bool:
            result = self.plane.kubectl("get", "node", self.name, "-o", "json", check=False)
            return result.returncode == 0

        self._wait(kubelet, registered, timeout_s)
        self.timings_s["kubelet_registered"] = time.monotonic() - begun
        # The cloud controller's part (--cloud-provider=external): the node's address is where its
        # kubelet listens, as the kwok nodes have theirs; then the node may take pods.
        status = {"status": {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}]}}
        self.plane.kubectl(
            "patch", "node", self.name, "--subresource=status", "--type=merge", "-p", json.dumps(status)
        )
        self.plane.kubectl("taint", "node", self.name, f"{UNINITIALIZED_TAINT}-", check=False)
        self._wait(kubelet, self.ready, timeout_s)
        self.timings_s["node_ready"] = time.monotonic() - begun

    def ready(self) -> bool:
        node = self.plane.get_json("node", self.name)
        conditions = node["status"].get("conditions", [])
        is_ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
        addresses = node["status"].get("addresses", [])
        taints = {t["key"] for t in node["spec"].get("taints", [])}
        return (
            is_ready
            and addresses == [{"type": "InternalIP", "address": "127.0.0.1"}]
            and UNINITIALIZED_TAINT not in taints
        )

    # ---- helpers ---------------------------------------------------------------------------------
    def _add(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Component:
        component = Component(name, argv, self.logs_dir / f"{name}.log", env=env)
        self._components.append(component)
        component.start()
        return component

    def _wait(self, component: Component, ready: Any, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not component.running():
                raise RealNodeError(f"{component.name} exited while starting:\n{component.log_tail()}")
            with contextlib.suppress(
                OSError, urllib.error.URLError, ValueError, KeyError, subprocess.SubprocessError
            ):
                if ready():
                    return
            time.sleep(0.1)
        raise RealNodeError(f"{component.name} not ready after {timeout_s:.0f} s:\n{component.log_tail()}")

    # ---- the record and the clean-up -------------------------------------------------------------
    @property
    def _record_path(self) -> Path:
        return RUN_DIR / "record.json"

    def _record(self) -> None:
        """Before touching anything, write down what the clean-up must restore: the sysctls' values
        and which outside paths existed. A run that is killed outright leaves this record, and the next
        start restores from it (:meth:`_recover_stale`)."""
        if KUBELET_ROOT.exists():
            raise RealNodeError(
                f"{KUBELET_ROOT} exists but no real node recorded it: another kubelet may run here; "
                "remove it if it is a leftover"
            )
        RUN_DIR.mkdir(parents=True, exist_ok=True)
        record = {
            "sysctls": {name: _read_sysctl(name) for name in KUBELET_SYSCTLS},
            "existed": {str(p): p.exists() for p in FOREIGN_PATHS},
        }
        self._record_path.write_text(json.dumps(record, indent=2))

    def _read_record(self) -> dict[str, Any] | None:
        try:
            record: dict[str, Any] = json.loads(self._record_path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        return record

    def _recover_stale(self) -> None:
        record = self._read_record()
        if record is not None:
            self._clean(record)

    def _clean(self, record: dict[str, Any]) -> None:
        # 1. The kubelet first (it would restart what we kill), then every pod process, the shims and
        #    containerd. Pods' processes live in the kubepods cgroups; shims are reparented to init.
        for component in [c for c in self._components if c.name == "kubelet"]:
            component.stop()
        self._kill_until_gone(
            lambda pid, exe, cmdline: exe == "kubelet" and f"--root-dir={KUBELET_ROOT}" in cmdline
        )
        pods: set[int] = set()

        def pods_now() -> None:  # the kubepods cgroups' processes as of this round, none from before
            pods.clear()
            pods.update(_pids_in_kubepods())

        self._kill_until_gone(lambda pid, exe, cmdline: pid in pods, refresh=pods_now)
        self._kill_until_gone(
            lambda pid, exe, cmdline: exe == "containerd-shim-runc-v2" and str(CONTAINERD_SOCKET) in cmdline
        )
        for component in self._components:
            component.stop()
        self._kill_until_gone(lambda pid, exe, cmdline: exe == "containerd" and str(RUN_DIR) in cmdline)
        # 2. Mounts under our directories, deepest first (overlay rootfs, shm, netns, secret tmpfs).
        roots = [str(KUBELET_ROOT), str(RUN_DIR), str(DATA_DIR), "/run/netns", "/run/containerd"]
        mounts = [m for m in _mountpoints() if any(m == r or m.startswith(r + "/") for r in roots)]
        for mountpoint in sorted(set(mounts), key=lambda m: m.count("/"), reverse=True):
            _umount(mountpoint)
        # 3. The kubepods cgroups, in every hierarchy, leaves first.
        for mount in _cgroup_mounts():
            top = mount / "kubepods"
            if not top.exists():
                continue
            for dirpath, _, _ in sorted(os.walk(top), key=lambda w: w[0].count("/"), reverse=True):
                _rmdir_cgroup(Path(dirpath))
        # 4. Sysctls back to what they were.
        for name, value in record["sysctls"].items():
            if _read_sysctl(name) != value:
                Path("/proc/sys", name).write_text(value)
        # 5. Files: our directories, and the outside ones only if they did not exist before.
        for path in (KUBELET_ROOT, DATA_DIR):
            shutil.rmtree(path, ignore_errors=True)
        for path_text, existed in record["existed"].items():
            path = Path(path_text)
            if not existed:
                shutil.rmtree(path, ignore_errors=True)
            elif path == Path("/var/log/containers"):
                for link in path.iterdir():
                    if link.is_symlink() and os.readlink(link).startswith(str(DATA_DIR)):
                        link.unlink()
        shutil.rmtree(RUN_DIR, ignore_errors=True)

    @staticmethod
    def _kill_until_gone(match: Any, timeout_s: float = 20.0, refresh: Any = None) -> None:
        """SIGKILL every process ``match`` picks until none is left. ``refresh`` (once per round)
        recomputes what ``match`` reads: walking the kubepods cgroups per process took minutes with
        110 pods. The deadline counts from the first kill, so a slow first look never skips it."""
        deadline: float | None = None
        while True:
            if refresh is not None:
                refresh()
            victims = [pid for pid, exe, cmdline in _processes() if match(pid, exe, cmdline)]
            if not victims:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise RealNodeError(f"processes {victims} survived SIGKILL for {timeout_s:.0f} s")
            for pid in victims:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            deadline = deadline or time.monotonic() + timeout_s
            time.sleep(0.1)


def _processes() -> Iterator[tuple[int, str, str]]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            exe = os.path.basename(os.readlink(entry / "exe"))
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        yield int(entry.name), exe, cmdline


def _pids_in_kubepods() -> set[int]:
    pids: set[int] = set()
    for mount in _cgroup_mounts():
        top = mount / "kubepods"
        if not top.exists():
            continue
        for dirpath, _, filenames in os.walk(top):
            if "cgroup.procs" in filenames:
                with contextlib.suppress(OSError):
                    pids.update(int(p) for p in Path(dirpath, "cgroup.procs").read_text().split())
    return pids


def _rmdir_cgroup(path: Path, timeout_s: float = 10.0) -> None:
    # A killed process leaves its cgroup a moment after it is reaped: retry EBUSY briefly.
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as error:
            if error.errno != 16 or time.monotonic() > deadline:  # EBUSY
                raise RealNodeError(f"cannot remove cgroup {path}: {error}") from error
            time.sleep(0.1)
