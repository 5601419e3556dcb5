"""kubemeter deployed the way users deploy it, on the real kubelet node ``real-0``: the image built here
(tools/image) imported into the node's containerd, ``helm install`` of charts/kubemeter (the operator
as a pod on its chart ServiceAccount), then ``kubectl apply`` of examples/gpu-chargeback.yaml with its
output pointed at ``kubemeter sink`` (a host process on 127.0.0.1) and its pods on real-0. The agent
DaemonSet pod and the gateway StatefulSet pod (on a Bound PV) run there in hostNetwork mode, and burner
pods on real-0 produce events:

- allocation meters exact against the API server's timestamps;
- the kubelet usage meter, read from the real kubelet's /stats/summary, within 1 % of the pods' own
  cgroup CPU counters, read by this test from the cgroup filesystem;
- PodResources ``List`` answered by the real kubelet to the agent pod.

The five defects of issue 12 are each reproduced first with the old pod settings, then shown fixed:
the state hostPath, the PodResources socket, liveness during a 120 s API-server outage, the gateway's
readiness, and Secrets readable by uid 65532. Pod Security levels are checked by the API server's own
admission (server-side dry run in namespaces labelled with each level).
"""

from __future__ import annotations

import base64
import copy
import glob
import itertools
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.controlplane import REPO_ROOT, ControlPlane, free_port, wait_for
from testbed.realnode import BUSYBOX_IMAGE, NAME, TOLERATION, RealNode, on_real_node
from tests.unit.chart.chart_tools import CHART_DIR, helm
from tools.image.build import BuiltImage, build_image

pytestmark = pytest.mark.integration

COLLECTOR = "chargeback"
WINDOW_S = 10
INTERVAL_S = 5  # the kubelet refreshes pod CPU stats about every 10 s; 2.5 intervals must cover that
AGENT_PORT, GATEWAY_PORT = 9464, 8480
CUSTOMER_LABEL = "billing.kubemeter.io/customer"
# cpu request, limit: the limit is the known load, well under what a burner gets on a loaded 2-core
# machine (100-150m and 190-280m measured with limits of 250m and 400m), so each burns at its quota.
BURNERS = {"burner-a": ("50m", "50m"), "burner-b": ("100m", "100m")}
# Windows compared as one span. The kubelet's /stats/summary stamps each sample to the whole second
# (metav1.Time) and refreshes it every 10-29 s; the meter spreads each delta over its stamped step, so
# at a constant rate each end of a span is off by under 1 s of burn: under 1 s / 150 s = 0.67 %.
USAGE_SPAN_WINDOWS = 15
STORAGE_CLASS = "kubemeter-e2e-local"
OUTAGE_S = 120


@dataclass
class Stack:
    plane: ControlPlane
    node: RealNode
    image: BuiltImage
    release: str
    namespace: str  # the Collector's
    workloads: str  # the burners'
    sink_url: str
    sink: subprocess.Popen[bytes]
    helm_home: Path
    state_dir: Path
    timings_s: dict[str, float] = field(default_factory=dict)

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        return self.plane.kubectl(*args, input=input, check=check, timeout_s=120).stdout

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def apply(self, documents: list[dict[str, Any]], namespace: str) -> None:
        self.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(documents))

    def pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.get("pods", "-n", namespace, "-l", selector)["items"]
        return items

    def pod(self, component: str) -> dict[str, Any]:
        (pod,) = self.pods(self.namespace, f"app.kubernetes.io/component={component}")
        return pod

    def sink_events(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.sink_url}/api/v1/usage/events", timeout=10) as response:
            events: list[dict[str, Any]] = json.loads(response.read())["events"]
        return events


# ---- helpers ----------------------------------------------------------------------------------------


def parse_time_ms(value: str) -> int:
    return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def restarts(pod: dict[str, Any]) -> int:
    return sum(c.get("restartCount", 0) for c in pod.get("status", {}).get("containerStatuses") or [])


def start_up_s(pod: dict[str, Any]) -> float:
    """From the pod's creation to its Ready condition, by the API server's clock."""
    created = parse_time_ms(pod["metadata"]["creationTimestamp"])
    (condition,) = [c for c in pod["status"]["conditions"] if c["type"] == "Ready"]
    return (parse_time_ms(condition["lastTransitionTime"]) - created) / 1000


def cgroup_dir(controller: str, pod_uid: str) -> Path:
    """The pod's cgroup (cgroupfs driver) in a v1 hierarchy holding ``controller``."""
    matches = glob.glob(f"/sys/fs/cgroup/*{controller}*/kubepods*/**/pod{pod_uid}", recursive=True)
    matches += glob.glob(f"/sys/fs/cgroup/*{controller}*/kubepods*/pod{pod_uid}")
    if not matches:
        raise FileNotFoundError(f"no {controller} cgroup for pod {pod_uid}")
    return Path(sorted(matches, key=len)[0])


def pod_memory_bytes(pod_uid: str) -> dict[str, int]:
    """Working set (usage minus inactive file cache, as the kubelet counts it) and RSS of the pod."""
    directory = cgroup_dir("memory", pod_uid)
    usage = int((directory / "memory.usage_in_bytes").read_text())
    stat = dict(line.split() for line in (directory / "memory.stat").read_text().splitlines())
    return {
        "working_set_bytes": usage - int(stat.get("total_inactive_file", 0)),
        "rss_bytes": int(stat.get("total_rss", 0)),
    }


def host_pids(pod_uid: str) -> list[int]:
    directory = cgroup_dir("cpuacct", pod_uid)
    pids: list[int] = []
    for procs in directory.rglob("cgroup.procs"):
        pids += [int(line) for line in procs.read_text().split()]
    return pids


def process_uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise ValueError(pid)


def exec_in(
    stack: Stack, pod: dict[str, Any], *command: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    argv = [
        "exec",
        "-n",
        pod["metadata"]["namespace"],
        pod["metadata"]["name"],
        "-c",
        pod["spec"]["containers"][0]["name"],
        "--",
        *command,
    ]
    return stack.plane.kubectl(*argv, check=check, timeout_s=60)


def dry_run_level(stack: Stack, pod_spec: dict[str, Any], level: str) -> str:
    """The API server's Pod Security admission on ``pod_spec`` in a namespace enforcing ``level``:
    empty when admitted, else its refusal."""
    namespace = f"pss-{level}"
    labels = {"pod-security.kubernetes.io/enforce": level}
    stack.apply(
        [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": labels}}],
        "default",
    )
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "pss-check"}, "spec": pod_spec}
    result = stack.plane.kubectl(
        "create", "-n", namespace, "--dry-run=server", "-f", "-", input=json.dumps(pod), check=False
    )
    return "" if result.returncode == 0 else result.stderr


def violated_controls(refusal: str) -> set[str]:
    """The Pod Security controls a refusal names: 'violates PodSecurity "L:latest": c1 (...), c2 (...)'."""
    _, _, listed = refusal.partition(':latest": ')
    return {part.split(" (")[0].strip() for part in listed.strip().split("), ") if part.strip()}


def example_documents(stack: Stack, sink_url: str) -> list[dict[str, Any]]:
    """examples/gpu-chargeback.yaml with the changes this cluster needs: output to the sink, one
    gateway, hostNetwork, pods on real-0, 10 s windows, a kubelet CPU usage meter in the same Pipeline,
    an ingest token (a Secret the agent must read as uid 65532)."""
    documents = list(yaml.safe_load_all((REPO_ROOT / "examples" / "gpu-chargeback.yaml").read_text()))
    for document in documents:
        spec = document.get("spec", {})
        if document["kind"] == "Collector":
            spec["output"]["url"] = sink_url
            spec["hostNetwork"] = True
            spec["tolerations"] = [TOLERATION]
            spec["nodeSelector"] = {"kubernetes.io/hostname": NAME}
            spec["agent"] |= {
                "intervalSeconds": INTERVAL_S,
                "gatewayUrl": f"http://127.0.0.1:{GATEWAY_PORT}",
                "kubeletCaSecretRef": {"name": "kubelet-ca", "key": "ca.crt"},
            }
            spec["gateway"] = {
                "replicas": 1,
                "nodeSelector": {"kubernetes.io/hostname": NAME},
                "tolerations": [TOLERATION],
                "ingestTokenSecretRef": {"name": "ingest-token", "key": "token"},
            }
            spec["buffer"] = {
                "size": "4Mi",
                "whenFull": "Block",
                "onDelete": "Retain",
                "storageClassName": STORAGE_CLASS,
            }
        if document["kind"] == "Meter":
            spec["windowSeconds"] = WINDOW_S
    usage = copy.deepcopy(
        next(d for d in documents if d["kind"] == "Meter" and d["metadata"]["name"] == "cpu-core-seconds")
    )
    usage["metadata"]["name"] = "cpu-usage-core-seconds"
    usage["spec"]["eventType"] = "cpu-usage-core-seconds"
    usage["spec"]["source"] = {"kubeletUsage": {"metric": "cpu"}}
    documents.append(usage)
    documents += [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "ingest-token"},
            "stringData": {"token": uuid.uuid4().hex},
        },
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "kubelet-ca"},
            "stringData": {"ca.crt": stack.plane.ca.cert.read_text()},
        },
    ]
    return documents


def gateway_volume(stack: Stack) -> dict[str, Any]:
    """A pre-created local PV for the gateway's claim, as an administrator (or a local-path provisioner,
    which makes its directories 0777) would: kubelets apply no fsGroup to hostPath-backed volumes."""
    directory = stack.state_dir / "gateway-volume"
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o777)
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": f"{stack.namespace}-gateway"},
        "spec": {
            "capacity": {"storage": "4Mi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": STORAGE_CLASS,
            "hostPath": {"path": str(directory), "type": "Directory"},
            "claimRef": {"namespace": stack.namespace, "name": f"data-{COLLECTOR}-gateway-0"},
        },
    }


def burner(name: str, request: str, limit: str) -> dict[str, Any]:
    return on_real_node(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": {"team": "vision"}},
            "spec": {
                "terminationGracePeriodSeconds": 0,
                "containers": [
                    {
                        "name": "burn",
                        "image": BUSYBOX_IMAGE,
                        "command": ["/bin/sh", "-c", "while :; do :; done"],
                        "resources": {
                            "requests": {"cpu": request, "memory": "8Mi"},
                            "limits": {"cpu": limit, "memory": "16Mi"},
                        },
                    }
                ],
            },
        }
    )


class CgroupSampler:
    """Each burner's pod cgroup CPU counter (cpuacct.usage, ns) with the test's own clock, every 100 ms."""

    def __init__(self, cgroups: dict[str, Path]) -> None:
        self.cgroups = cgroups
        self.samples: dict[str, list[tuple[float, int]]] = {name: [] for name in cgroups}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, directory in self.cgroups.items():
                try:
                    value = int((directory / "cpuacct.usage").read_text())
                except OSError:
                    continue
                self.samples[name].append((time.time(), value))
            self._stop.wait(0.1)

    def __enter__(self) -> CgroupSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def at(self, name: str, when_s: float) -> float:
        """The counter at ``when_s``, linear between the two samples around it."""
        samples = self.samples[name]
        for (t0, v0), (t1, v1) in itertools.pairwise(samples):
            if t0 <= when_s <= t1:
                return v0 + (v1 - v0) * (when_s - t0) / (t1 - t0)
        raise ValueError(f"{when_s} outside the samples of {name}")

    def covers(self, name: str, start_s: float, end_s: float) -> bool:
        samples = self.samples[name]
        return bool(samples) and samples[0][0] <= start_s and samples[-1][0] >= end_s


def events_of(stack: Stack, event_type: str) -> dict[tuple[str, int], Decimal]:
    """(pod, window start ms) -> value of the sink's events of one type, checked to be unique."""
    found: dict[tuple[str, int], Decimal] = {}
    for event in stack.sink_events():
        if event["type"] != event_type or event["dimensions"].get("namespace") != stack.workloads:
            continue
        key = (event["dimensions"]["pod"], parse_time_ms(event["dimensions"]["window_start"]))
        assert key not in found, f"two events for {key}"
        found[key] = Decimal(str(event["value"]))
    return found


def diagnosis(stack: Stack) -> str:
    """What a failed wait needs: the sink's events by type, one of each, and the agent's log."""
    events = stack.sink_events()
    by_type: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_type.setdefault(event["type"], []).append(event)
    lines = [f"sink: {len(events)} events; " + ", ".join(f"{t}: {len(e)}" for t, e in by_type.items())]
    lines += [json.dumps(found[-1])[:600] for found in by_type.values()]
    agent = stack.pod("agent")["metadata"]["name"]
    logs = stack.kubectl("logs", "-n", stack.namespace, agent, "--tail=40", check=False)
    return "\n".join([*lines, "agent log:", logs])


# ---- the stack ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(
    cluster: ControlPlane, real_node: RealNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("helm-real-node")
    timings: dict[str, float] = {}
    started = time.monotonic()
    image = build_image()
    timings["image build (cache hit)" if image.cached else "image build (cold)"] = image.seconds
    started = time.monotonic()
    real_node.import_image(image.archive)
    assert image.name in real_node.images()
    timings["image import"] = time.monotonic() - started

    sink_port = free_port()
    sink_url = f"http://127.0.0.1:{sink_port}"
    sink_log = (state / "sink.log").open("ab")
    sink = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kubemeter_cli",
            "sink",
            "--host",
            "127.0.0.1",
            "--port",
            str(sink_port),
            "--data-dir",
            str(state / "sink"),
        ],
        stdout=sink_log,
        stderr=subprocess.STDOUT,
        cwd=REPO_ROOT,
    )
    suffix = uuid.uuid4().hex[:6]
    stack = Stack(
        cluster,
        real_node,
        image,
        f"km-{suffix}",
        f"km-metering-{suffix}",
        f"km-work-{suffix}",
        sink_url,
        sink,
        state / "helm",
        state,
        timings,
    )
    try:
        wait_for(lambda: http_ok(f"{sink_url}/healthz"), timeout_s=60, what="kubemeter sink")
        # hostNetwork pods need Pod Security "privileged" (install.md, Pod Security); warnings name what else.
        for namespace, labels in (
            (
                stack.release,
                {
                    "pod-security.kubernetes.io/enforce": "privileged",
                    "pod-security.kubernetes.io/warn": "restricted",
                },
            ),
            (
                stack.namespace,
                {
                    "pod-security.kubernetes.io/enforce": "privileged",
                    "pod-security.kubernetes.io/warn": "baseline",
                },
            ),
            (stack.workloads, {CUSTOMER_LABEL: "acme"}),
        ):
            stack.apply(
                [
                    {
                        "apiVersion": "v1",
                        "kind": "Namespace",
                        "metadata": {"name": namespace, "labels": labels},
                    }
                ],
                "default",
            )
        started = time.monotonic()
        repository, _, tag = image.name.rpartition(":")
        api_port = cluster.api_url.rsplit(":", 1)[1]
        values = {
            "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
            "hostNetwork": True,
            "apiServerAddress": f"127.0.0.1:{api_port}",
            "clusterName": "e2e",
            "operator": {
                "livenessPort": free_port(),
                "metricsPort": free_port(),
                "nodeSelector": {"kubernetes.io/hostname": NAME},
                "tolerations": [TOLERATION],
                "resyncSeconds": 10,
            },
        }
        values_file = state / "values.yaml"
        values_file.write_text(yaml.safe_dump(values))
        helm(
            "install",
            stack.release,
            str(CHART_DIR),
            "-n",
            stack.release,
            "-f",
            str(values_file),
            "--kubeconfig",
            str(cluster.kubeconfig),
            "--wait",
            "--timeout",
            "180s",
            home=stack.helm_home,
            timeout_s=240,
        )
        timings["helm install --wait (operator Ready)"] = time.monotonic() - started

        stack.apply(
            [
                {
                    "apiVersion": "storage.k8s.io/v1",
                    "kind": "StorageClass",
                    "metadata": {"name": STORAGE_CLASS},
                    "provisioner": "kubernetes.io/no-provisioner",
                    "volumeBindingMode": "Immediate",
                }
            ],
            "default",
        )
        stack.apply([gateway_volume(stack)], "default")
        started = time.monotonic()
        stack.apply(example_documents(stack, sink_url), stack.namespace)

        def both_ready() -> bool:
            pods = stack.pods(stack.namespace, "app.kubernetes.io/part-of=kubemeter")
            return len(pods) == 2 and all(ready(p) and p["spec"].get("nodeName") == NAME for p in pods)

        wait_for(both_ready, timeout_s=180, interval_s=1, what="agent and gateway pods Ready on real-0")
        timings["kubectl apply -> agent and gateway Ready"] = time.monotonic() - started
        yield stack
    finally:
        helm(
            "uninstall",
            stack.release,
            "-n",
            stack.release,
            "--kubeconfig",
            str(cluster.kubeconfig),
            home=stack.helm_home,
            check=False,
        )
        for namespace in (
            stack.namespace,
            stack.workloads,
            stack.release,
            "pss-restricted",
            "pss-baseline",
            "pss-privileged",
        ):
            cluster.kubectl(
                "delete", "namespace", namespace, "--wait=false", "--ignore-not-found", check=False
            )
        cluster.kubectl(
            "delete", "pv", f"{stack.namespace}-gateway", "--wait=false", "--ignore-not-found", check=False
        )
        stack.sink.terminate()  # the gateway test restarts it: the current one
        stack.sink.wait(timeout=20)
        sink_log.close()
        print(f"\n[helm on real-0] timings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}")


# ---- the tests, in the order they run ----------------------------------------------------------------


def test_chart_installs_and_every_kubemeter_pod_is_running_and_ready_on_real_0(stack: Stack) -> None:
    operator = stack.pods(stack.release, "app.kubernetes.io/component=operator")
    pods = [*operator, stack.pod("agent"), stack.pod("gateway")]
    for pod in pods:
        assert pod["spec"]["nodeName"] == NAME and ready(pod) and pod["status"]["phase"] == "Running"
        assert pod["spec"]["containers"][0]["image"] == stack.image.name
    assert operator[0]["spec"]["serviceAccountName"] == f"{stack.release}-kubemeter-operator"
    claim = stack.get("pvc", "-n", stack.namespace, f"data-{COLLECTOR}-gateway-0")
    assert claim["status"]["phase"] == "Bound"
    figures = {
        pod["metadata"]["labels"]["app.kubernetes.io/component"]: {
            "start_up_s": start_up_s(pod),
            **pod_memory_bytes(pod["metadata"]["uid"]),
        }
        for pod in pods
    }
    print(f"\n[helm on real-0] pods: {json.dumps(figures)}")


def test_the_image_runs_as_its_own_user_65532_with_kubemeter_as_entrypoint(stack: Stack) -> None:
    # The agent and gateway containers set no runAsUser: the uid is the pod's, 65532; their host
    # processes show the image's entrypoint and venv.
    for component in ("agent", "gateway"):
        pod = stack.pod(component)
        pids = [
            p
            for p in host_pids(pod["metadata"]["uid"])
            if b"kubemeter" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        assert pids, f"no kubemeter process in the {component} pod's cgroup"
        assert {process_uid(p) for p in pids} == {65532}
        argv = Path(f"/proc/{pids[0]}/cmdline").read_bytes().split(b"\0")
        assert argv[0] == b"/opt/kubemeter/bin/python3" or argv[0].startswith(b"/opt/kubemeter/bin/python")
        assert argv[1] == b"/opt/kubemeter/bin/kubemeter" and argv[2].decode() == component


def test_the_agent_state_hostpath_is_written_as_65532_and_without_the_init_step_it_crashes(
    stack: Stack,
) -> None:
    agent = stack.pod("agent")
    (state,) = [v for v in agent["spec"]["volumes"] if v["name"] == "state"]
    host_dir = Path(state["hostPath"]["path"])
    wait_for(lambda: any(host_dir.rglob("*")), timeout_s=60, what="agent state files")
    owners = {(path.stat().st_uid, path.stat().st_gid) for path in [host_dir, *host_dir.rglob("*")]}
    assert owners == {(65532, 65532)}, owners
    # Reproduce the defect: the same pod without its init step, on a fresh state directory.
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "agent-without-init"},
        "spec": copy.deepcopy(agent["spec"]),
    }
    spec = pod["spec"]
    for key in ("nodeName", "initContainers"):
        spec.pop(key, None)
    (state_volume,) = [v for v in spec["volumes"] if v["name"] == "state"]
    state_volume["hostPath"]["path"] = str(host_dir) + "-repro"
    container = spec["containers"][0]
    container.pop("startupProbe"), container.pop("livenessProbe"), container.pop("readinessProbe")
    # hostNetwork: its own port (the scheduler refuses a second pod on the agent's host port)
    port = free_port()
    container["args"] = [*container["args"], f"--metrics-port={port}"]
    container["ports"] = [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
    stack.apply([pod], stack.namespace)
    try:

        def failed() -> str:
            status = stack.get("pod", "-n", stack.namespace, "agent-without-init")["status"]
            for container_status in status.get("containerStatuses") or []:
                terminated = (container_status.get("lastState") or {}).get("terminated") or (
                    container_status.get("state") or {}
                ).get("terminated")
                if terminated:
                    return stack.kubectl(
                        "logs",
                        "-n",
                        stack.namespace,
                        "agent-without-init",
                        "--previous" if container_status.get("restartCount") else "--tail=50",
                        check=False,
                    )
            return ""

        logs = wait_for(failed, timeout_s=90, what="the agent without its init step to fail")
        assert "Permission denied" in logs or "PermissionError" in logs, logs
    finally:
        stack.kubectl(
            "delete",
            "pod",
            "-n",
            stack.namespace,
            "agent-without-init",
            "--grace-period=0",
            "--force",
            check=False,
        )
        shutil.rmtree(str(host_dir) + "-repro", ignore_errors=True)


def test_secrets_are_readable_by_65532_through_fs_group_and_were_not_without(stack: Stack) -> None:
    agent = stack.pod("agent")
    token = exec_in(stack, agent, "cat", "/etc/kubemeter/secrets/ingest-token/token").stdout.strip()
    secret = stack.get("secret", "-n", stack.namespace, "ingest-token")
    assert token == base64.b64decode(secret["data"]["token"]).decode()
    # The old mount: 0440, no fsGroup, uid 65532.
    pod = on_real_node(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "secret-without-fsgroup"},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": True},
                "containers": [{"name": "read", "image": BUSYBOX_IMAGE, "command": ["cat", "/secret/token"]}],
                "volumes": [{"name": "s", "secret": {"secretName": "ingest-token", "defaultMode": 0o440}}],
            },
        }
    )
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "s", "mountPath": "/secret"}]
    stack.apply([pod], stack.namespace)
    try:
        phase = wait_for(
            lambda: (
                stack.get("pod", "-n", stack.namespace, "secret-without-fsgroup")["status"].get("phase")
                in ("Succeeded", "Failed")
                and stack.get("pod", "-n", stack.namespace, "secret-without-fsgroup")["status"]["phase"]
            ),
            timeout_s=60,
            what="the pod reading the Secret without fsGroup to end",
        )
        logs = stack.kubectl("logs", "-n", stack.namespace, "secret-without-fsgroup", check=False)
        assert phase == "Failed" and "Permission denied" in logs, (phase, logs)
    finally:
        stack.kubectl(
            "delete",
            "pod",
            "-n",
            stack.namespace,
            "secret-without-fsgroup",
            "--grace-period=0",
            "--force",
            check=False,
        )


def test_burners_on_real_0_are_billed_exactly_and_their_kubelet_cpu_is_within_1_percent_of_the_cgroup(
    stack: Stack,
) -> None:
    stack.apply([burner(name, *resources) for name, resources in BURNERS.items()], stack.workloads)
    wait_for(
        lambda: (
            all(
                p["status"].get("phase") == "Running"
                for p in stack.get("pods", "-n", stack.workloads)["items"]
            )
            and len(stack.get("pods", "-n", stack.workloads)["items"]) == len(BURNERS)
        ),
        timeout_s=60,
        what="burners running",
    )
    pods = {p["metadata"]["name"]: p for p in stack.get("pods", "-n", stack.workloads)["items"]}
    cgroups = {name: cgroup_dir("cpuacct", pod["metadata"]["uid"]) for name, pod in pods.items()}
    cpu_usage: dict[tuple[str, int], Decimal] = {}
    with CgroupSampler(cgroups) as sampler:
        first_s = time.time()
        # The window the pods started in, then USAGE_SPAN_WINDOWS full windows; the pods keep running
        # until the agent has metered them (a window's usage needs a kubelet sample after its end).
        # The first full window is only measured: the first counter read is spread back to the pod's
        # startTime, before its container ran (sandbox set-up), so that window is low by that share.
        first_full_s = (int(first_s) // WINDOW_S + 1) * WINDOW_S
        checked_windows = [first_full_s + i * WINDOW_S for i in range(1, USAGE_SPAN_WINDOWS + 1)]
        measured_windows = [first_full_s, *checked_windows]

        def usage_delivered() -> bool:
            nonlocal cpu_usage
            cpu_usage = events_of(stack, "cpu-usage-core-seconds")
            return all((name, start * 1000) in cpu_usage for name in pods for start in measured_windows)

        try:
            wait_for(
                usage_delivered,
                timeout_s=(USAGE_SPAN_WINDOWS + 2) * WINDOW_S + 90,  # + the 60 s sample hold
                interval_s=1,
                what="kubelet usage events in the sink",
            )
        except TimeoutError as error:
            raise AssertionError(f"{error}\nwanted windows {checked_windows}\n{diagnosis(stack)}") from None
    ends_ms = delete_and_read_end_ms(stack, stack.workloads, list(pods))
    compared: dict[str, tuple[float, float, float]] = {}
    for name in pods:
        for start in measured_windows:
            assert sampler.covers(name, start, start + WINDOW_S)
            cgroup_core_s = (sampler.at(name, start + WINDOW_S) - sampler.at(name, start)) / 1e9
            usage_core_s = float(cpu_usage[(name, start * 1000)])
            error_percent = round(100 * (usage_core_s - cgroup_core_s) / cgroup_core_s, 2)
            compared[f"{name}@{start - first_full_s}s"] = (usage_core_s, cgroup_core_s, error_percent)
    print(f"\n[helm on real-0] kubelet usage vs cgroup (core-s, core-s, error %): {json.dumps(compared)}")
    # Over the span of the checked windows, within 1 %. Window by window the error is printed, not
    # asserted: the kubelet's samples are 10-29 s apart and stamped to the second, and the agent
    # spreads each delta evenly over its step, so a 10 s window can be off by up to 1 s of burn (10 %)
    # and its neighbour by the opposite amount (docs/testing.md has the figures).
    span_s = USAGE_SPAN_WINDOWS * WINDOW_S
    totals = {}
    for name in pods:
        metered_total = sum(compared[f"{name}@{start - first_full_s}s"][0] for start in checked_windows)
        cgroup_total = sum(compared[f"{name}@{start - first_full_s}s"][1] for start in checked_windows)
        totals[name] = {
            "metered_core_s": metered_total,
            "cgroup_core_s": cgroup_total,
            "error_percent": round(100 * (metered_total - cgroup_total) / cgroup_total, 3),
            "cgroup_rate_cores": round(cgroup_total / span_s, 4),
        }
    print(f"\n[helm on real-0] kubelet usage vs cgroup over {span_s} s: {json.dumps(totals)}")
    for name, total in totals.items():
        assert abs(total["metered_core_s"] - total["cgroup_core_s"]) <= 0.01 * total["cgroup_core_s"], (
            name,
            total,
        )

    # Allocation: exact against the pods' binding and deletion times from the API server, every window.
    for name, (request, _) in BURNERS.items():
        expected = expected_allocation(
            scheduled_ms(pods[name]), ends_ms[name], int(request.removesuffix("m"))
        )
        wait_for(
            lambda name=name, expected=expected: (
                {(name, start) for start in expected} <= set(events_of(stack, "cpu-core-seconds"))
            ),
            timeout_s=60,
            interval_s=1,
            what=f"every allocation window of {name}",
        )
        allocation = events_of(stack, "cpu-core-seconds")
        metered = {key: value for key, value in allocation.items() if key[0] == name}
        assert metered == {(name, start): value for start, value in expected.items()}, name


def scheduled_ms(pod: dict[str, Any]) -> int:
    (scheduled,) = [c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled"]
    return parse_time_ms(scheduled["lastTransitionTime"])


def delete_and_read_end_ms(stack: Stack, namespace: str, names: list[str]) -> dict[str, int]:
    """Delete with a 1 s grace and read, from the API server, when each deletion was requested:
    deletionTimestamp minus deletionGracePeriodSeconds (docs/metering.md, allocation end)."""
    stack.kubectl("delete", "pods", "-n", namespace, *names, "--grace-period=1", "--wait=false")
    ends_ms = {}
    for pod in stack.get("pods", "-n", namespace)["items"]:
        meta = pod["metadata"]
        if meta["name"] in names:
            ends_ms[meta["name"]] = (
                parse_time_ms(meta["deletionTimestamp"]) - 1000 * meta["deletionGracePeriodSeconds"]
            )
    assert set(ends_ms) == set(names), "a pod was gone before its deletion could be read"
    wait_for(
        lambda: (
            not [p for p in stack.get("pods", "-n", namespace)["items"] if p["metadata"]["name"] in names]
        ),
        timeout_s=60,
        what="pods gone",
    )
    return ends_ms


def expected_allocation(start_ms: int, end_ms: int, millicores: int) -> dict[int, Decimal]:
    """window start ms -> core-seconds held in it: millicores x overlap ms / 10^6."""
    window_ms = WINDOW_S * 1000
    expected = {}
    window = start_ms // window_ms * window_ms
    while window < end_ms:
        overlap_ms = min(window + window_ms, end_ms) - max(window, start_ms)
        expected[window] = Decimal(millicores * overlap_ms) / Decimal(10**6)
        window += window_ms
    return expected


PODRESOURCES_LIST = """
import grpc, json
from kubemeter.sources.podresources import api_pb2, api_pb2_grpc
channel = grpc.insecure_channel("unix:///var/lib/kubelet/pod-resources/kubelet.sock")
response = api_pb2_grpc.PodResourcesListerStub(channel).List(api_pb2.ListPodResourcesRequest(), timeout=10)
print(json.dumps(sorted(p.namespace + "/" + p.name for p in response.pod_resources)))
"""


def pods_on_real_0(stack: Stack) -> set[str]:
    pods = stack.get("pods", "--all-namespaces", "--field-selector", f"spec.nodeName={NAME}")["items"]
    return {
        f"{p['metadata']['namespace']}/{p['metadata']['name']}"
        for p in pods
        if p["status"].get("phase") in ("Pending", "Running") and not p["metadata"].get("deletionTimestamp")
    }


def test_pod_resources_list_is_answered_by_the_real_kubelet_to_an_nvml_agent_and_refused_to_65532(
    stack: Stack,
) -> None:
    # Reproduce the defect: the agent's user, 65532, with the kubelet's directory mounted.
    agent = stack.pod("agent")
    repro = on_real_node(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "podresources-as-65532"},
            "spec": {
                "restartPolicy": "Never",
                "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": True},
                "containers": [
                    {
                        "name": "list",
                        "image": stack.image.name,
                        "command": ["/opt/kubemeter/bin/python", "-c", PODRESOURCES_LIST],
                        "volumeMounts": [{"name": "pr", "mountPath": "/var/lib/kubelet/pod-resources"}],
                    }
                ],
                "volumes": [{"name": "pr", "hostPath": {"path": "/var/lib/kubelet/pod-resources"}}],
            },
        }
    )
    stack.apply([repro], stack.namespace)
    try:
        phase = wait_for(
            lambda: (
                (stack.get("pod", "-n", stack.namespace, "podresources-as-65532")["status"].get("phase"))
                in ("Succeeded", "Failed")
                and stack.get("pod", "-n", stack.namespace, "podresources-as-65532")["status"]["phase"]
            ),
            timeout_s=90,
            what="the PodResources call as 65532 to end",
        )
        logs = stack.kubectl("logs", "-n", stack.namespace, "podresources-as-65532", check=False)
        assert phase == "Failed" and "Permission denied" in logs, (phase, logs[-2000:])
    finally:
        stack.kubectl(
            "delete",
            "pod",
            "-n",
            stack.namespace,
            "podresources-as-65532",
            "--grace-period=0",
            "--force",
            check=False,
        )
    # The fix: an NVML meter bound to the Collector makes the operator run the agent as uid 0 with no
    # capabilities and mount the socket's directory; the real kubelet answers List.
    nvml = {
        "apiVersion": "kubemeter.io/v1alpha1",
        "kind": "Meter",
        "metadata": {"name": "gpu-utilization", "labels": {"billing.kubemeter.io/plan": "compute"}},
        "spec": {
            "eventType": "gpu-utilization",
            "unit": "gpu-seconds",
            "windowSeconds": WINDOW_S,
            "source": {"nvml": {"metric": "utilization"}},
            "pods": {
                "namespaceSelector": {"matchExpressions": [{"key": CUSTOMER_LABEL, "operator": "Exists"}]}
            },
        },
    }
    stack.apply([nvml], stack.namespace)

    def root_agent_ready() -> dict[str, Any] | None:
        pods = stack.pods(stack.namespace, "app.kubernetes.io/component=agent")
        if len(pods) != 1 or pods[0]["metadata"]["uid"] == agent["metadata"]["uid"] or not ready(pods[0]):
            return None
        context = pods[0]["spec"]["containers"][0].get("securityContext", {})
        return pods[0] if context.get("runAsUser") == 0 else None

    root_agent = wait_for(root_agent_ready, timeout_s=120, interval_s=1, what="the NVML agent (uid 0) Ready")
    context = root_agent["spec"]["containers"][0]["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"]} and context["allowPrivilegeEscalation"] is False
    listed = json.loads(
        exec_in(stack, root_agent, "/opt/kubemeter/bin/python", "-c", PODRESOURCES_LIST).stdout
    )
    expected = pods_on_real_0(stack)
    assert set(listed) == expected, (listed, expected)
    pids = [
        p
        for p in host_pids(root_agent["metadata"]["uid"])
        if b"kubemeter" in Path(f"/proc/{p}/cmdline").read_bytes()
    ]
    assert pids and {process_uid(p) for p in pids} == {0}
    # its state directory was handed to uid 0 by the init step
    (state,) = [v for v in root_agent["spec"]["volumes"] if v["name"] == "state"]
    assert Path(state["hostPath"]["path"]).stat().st_uid == 0
    stack.kubectl("delete", "meter", "-n", stack.namespace, "gpu-utilization")

    def back_to_65532() -> bool:
        pods = stack.pods(stack.namespace, "app.kubernetes.io/component=agent")
        return (
            len(pods) == 1
            and ready(pods[0])
            and "runAsUser" not in pods[0]["spec"]["containers"][0].get("securityContext", {})
        )

    wait_for(back_to_65532, timeout_s=120, interval_s=1, what="the agent back to uid 65532")


def test_pod_security_levels_are_what_the_docs_say_by_the_api_servers_admission(stack: Stack) -> None:
    def without_host_network(spec: dict[str, Any]) -> dict[str, Any]:
        spec = copy.deepcopy(spec)
        spec.pop("nodeName", None)
        spec.pop("hostNetwork", None)
        spec.pop("dnsPolicy", None)
        # The API server defaults hostPort to containerPort in a hostNetwork pod; nothing sets it.
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            for port in container.get("ports", []):
                port.pop("hostPort", None)
        return spec

    operator = stack.pods(stack.release, "app.kubernetes.io/component=operator")[0]["spec"]
    gateway = stack.pod("gateway")["spec"]
    agent = stack.pod("agent")["spec"]
    for name, spec in (("operator", operator), ("gateway", gateway)):
        assert dry_run_level(stack, without_host_network(spec), "restricted") == "", name
        refusal = dry_run_level(stack, {**without_host_network(spec), "hostNetwork": True}, "baseline")
        assert "host namespaces" in refusal, (name, refusal)
    refusal = dry_run_level(stack, without_host_network(agent), "baseline")
    # hostPath, and the state-owner init step's DAC_READ_SEARCH (CHOWN and FOWNER are in baseline)
    assert violated_controls(refusal) == {"hostPath volumes", "non-default capabilities"}, refusal
    assert 'container "state-owner" must not include "DAC_READ_SEARCH"' in refusal, refusal
    assert dry_run_level(stack, without_host_network(agent), "privileged") == ""
    refusal = dry_run_level(stack, without_host_network(agent), "restricted")
    # restricted refuses the hostPath and, of the containers, only the state-owner init step (uid 0)
    assert violated_controls(refusal) == {
        "restricted volume types",
        "unrestricted capabilities",
        "runAsNonRoot != true",
        "runAsUser=0",
    }, refusal
    assert refusal.count('container "') == refusal.count('container "state-owner"'), refusal


def test_gateway_readiness_follows_its_buffer_where_healthz_said_ok(stack: Stack) -> None:
    gateway = stack.pod("gateway")
    token = exec_in(
        stack, stack.pod("agent"), "cat", "/etc/kubemeter/secrets/ingest-token/token"
    ).stdout.strip()
    stack.sink.terminate()
    stack.sink.wait(timeout=20)  # delivery fails from now on; the buffer only grows
    url = f"http://127.0.0.1:{GATEWAY_PORT}"
    payload = "x" * 900
    sent = 0
    try:
        for batch in range(200):
            events = [
                {
                    "specversion": "1.0",
                    "id": f"fill-{batch}-{i}",
                    "source": "e2e/fill",
                    "type": "fill",
                    "subject": "s",
                    "time": "2026-01-01T00:00:00Z",
                    "data": {"value": 1, "pad": payload},
                }
                for i in range(100)
            ]
            request = urllib.request.Request(
                f"{url}/api/v1/events",
                data=json.dumps(events).encode(),
                headers={
                    "Content-Type": "application/cloudevents-batch+json",
                    "Authorization": f"Bearer {token}",
                },
            )
            try:
                urllib.request.urlopen(request, timeout=10)
                sent += len(events)
            except urllib.error.HTTPError as error:
                assert error.code == 503, error.read()
                break
        else:
            pytest.fail("the 4Mi buffer never filled")
        # the old probe path still answers 200 while the buffer refuses ingest
        assert urllib.request.urlopen(f"{url}/healthz", timeout=5).status == 200
        wait_for(
            lambda: not ready(stack.pod("gateway")), timeout_s=30, what="the full gateway to turn unready"
        )
        assert restarts(stack.pod("gateway")) == restarts(gateway)
    finally:
        sink_log = (stack.state_dir / "sink.log").open("ab")
        stack.sink = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kubemeter_cli",
                "sink",
                "--host",
                "127.0.0.1",
                "--port",
                stack.sink_url.rsplit(":", 1)[1],
                "--data-dir",
                str(stack.state_dir / "sink"),
            ],
            stdout=sink_log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
    try:
        wait_for(
            lambda: ready(stack.pod("gateway")),
            timeout_s=120,
            interval_s=1,
            what="the drained gateway Ready again",
        )
    except TimeoutError as error:
        with urllib.request.urlopen(f"{url}/status", timeout=5) as response:
            status = response.read().decode()
        name = stack.pod("gateway")["metadata"]["name"]
        logs = stack.kubectl("logs", "-n", stack.namespace, name, "--tail=60", check=False)
        report = f"sent {sent}\nstatus: {status}\n{diagnosis(stack)}\ngateway log:\n{logs}"
        raise AssertionError(f"{error}\n{report}") from None

    # Ready again means room for a batch, not an empty buffer: the rest is still being delivered.
    def fill_events() -> list[dict[str, Any]]:
        return [e for e in stack.sink_events() if e["type"] == "fill"]

    wait_for(lambda: len(fill_events()) >= sent, timeout_s=120, interval_s=1, what="every fill event")
    fill = fill_events()
    assert len({e["eventId"] for e in fill}) == len(fill) == sent


def test_api_server_stopped_120_s_restarts_no_agent_and_loses_nothing_where_the_old_probe_restarted(
    stack: Stack,
) -> None:
    agent = stack.pod("agent")
    # The old probe, reproduced: the same agent with liveness on /healthz, on its own port and state.
    old = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "agent-old-probes"},
        "spec": copy.deepcopy(agent["spec"]),
    }
    spec = old["spec"]
    spec.pop("nodeName", None)
    old_port = free_port()
    (state_volume,) = [v for v in spec["volumes"] if v["name"] == "state"]
    state_volume["hostPath"]["path"] += "-old-probes"
    container = spec["containers"][0]
    container["args"] = [*container["args"], f"--metrics-port={old_port}"]
    container["ports"] = [{"name": "metrics", "containerPort": old_port, "protocol": "TCP"}]
    container.pop("startupProbe")
    container["livenessProbe"] = {
        "httpGet": {"path": "/healthz", "port": "metrics"},
        "periodSeconds": 20,
        "failureThreshold": 3,
        "timeoutSeconds": 5,
        "initialDelaySeconds": 5,
    }
    container["readinessProbe"]["httpGet"]["path"] = "/healthz"
    stack.apply([old], stack.namespace)
    wait_for(
        lambda: ready(stack.get("pod", "-n", stack.namespace, "agent-old-probes")),
        timeout_s=90,
        what="the old-probe agent Ready",
    )
    stack.apply([burner("burner-outage", "100m", "200m")], stack.workloads)
    wait_for(
        lambda: stack.get("pod", "-n", stack.workloads, "burner-outage")["status"].get("phase") == "Running",
        timeout_s=60,
        what="burner running",
    )
    apiserver = next(c for c in stack.plane.components if c.name == "kube-apiserver")
    outage_started = time.monotonic()
    apiserver.stop()
    try:
        time.sleep(OUTAGE_S)  # the outage itself is the condition under test
    finally:
        apiserver.start()
    wait_for(
        lambda: stack.plane.kubectl("get", "--raw", "/readyz", check=False).returncode == 0,
        timeout_s=120,
        what="the API server back",
    )
    print(f"\n[helm on real-0] API server down {time.monotonic() - outage_started:.0f} s")
    try:
        new_agent = wait_for(
            lambda: (p := stack.pod("agent")) and ready(p) and p, timeout_s=120, what="the agent Ready"
        )
        assert new_agent["metadata"]["uid"] == agent["metadata"]["uid"] and restarts(new_agent) == restarts(
            agent
        )
        old_pod = wait_for(
            lambda: restarts(p := stack.get("pod", "-n", stack.namespace, "agent-old-probes")) > 0 and p,
            timeout_s=60,
            what="the old-probe agent to have been restarted by its liveness probe",
        )
        assert restarts(old_pod) >= 1
        # nothing lost: every window of the burner through the outage, exactly once and exact
        burner_pod = stack.get("pod", "-n", stack.workloads, "burner-outage")
        ends_ms = delete_and_read_end_ms(stack, stack.workloads, ["burner-outage"])
        expected = expected_allocation(scheduled_ms(burner_pod), ends_ms["burner-outage"], 100)
        assert len(expected) >= OUTAGE_S // WINDOW_S
        wait_for(
            lambda: (
                set(expected)
                <= {w for (n, w) in events_of(stack, "cpu-core-seconds") if n == "burner-outage"}
            ),
            timeout_s=90,
            interval_s=1,
            what="every allocation window of the burner through the outage",
        )
        metered = {w: v for (n, w), v in events_of(stack, "cpu-core-seconds").items() if n == "burner-outage"}
        assert metered == expected
    finally:
        stack.kubectl(
            "delete",
            "pod",
            "-n",
            stack.namespace,
            "agent-old-probes",
            "--grace-period=0",
            "--force",
            check=False,
        )
