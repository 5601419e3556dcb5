"""Agent CPU and memory on the example's real configuration, with pods churning (issues 4 and 16).

The 110-pod point is a **real node**: ``real-0`` (:mod:`testbed.realnode`: containerd + runc + a
kubelet of the API server's version, ``maxPods`` 120: the kubelet counts the churn's pods still
stopping) runs 110 busybox pods that sleep, and the agent polls that kubelet's own
``/stats/summary``. real-0 advertises ``nvidia.com/gpu`` as an extended resource (its status
capacity patched, as a cluster operator advertises one; no device plugin, so the kubelet admits GPU
pods without devices), so every tenth pod holds a GPU there too. The 250- and 500-pod points are
kwok nodes (``bench-250``, ``bench-500``: a real kubelet holds 110 pods by default) whose kubelet is
a stand-in (:mod:`testbed.kubelet_endpoint`, TLS and a bearer token, where the Node says its kubelet
is) serving ``/stats/summary`` for the pods the node holds at that moment, with cumulative CPU
counters. Pods have CPU and memory requests across five customer namespaces. All through warm-up and
measurement a churn thread deletes a random pod of each node and creates a new one every
:data:`CHURN_EVERY_S`: on real-0 with a graceful delete (the kubelet stops the containers before the
pod goes), and a watch on real-0's pods times how long a created pod takes to run and a deleted one
to go.

One ``kubemeter agent`` per node, each a host process (as the DaemonSet's pod would be, with the
node's name), runs the three Meters of ``examples/gpu-chargeback.yaml`` (GPU, CPU, memory
allocation, with their CEL subject, dimensions and the Pipeline's set/drop) plus a kubelet usage
Meter (``kubeletUsage: cpu``), and the Pipeline's processors gain the filter the example suggests,
``double(event.data.value) > 0.0``, which needs the CEL interpreter (celpy): it is loaded in every
agent measured here. Intervals of 10 s, 60 s windows, the real spool forwarding to a ``kubemeter
gateway`` that delivers to ``kubemeter sink``.

After a warm-up (health endpoint up, then two intervals), each agent's CPU is read from
``/proc/<pid>/stat`` (utime + stime) at the start and end of a measured period that spans a clock-
aligned 60 s window boundary, so closing windows and emitting events are in the figure; RSS
(``/proc/<pid>/status`` VmRSS) is sampled every 100 ms. All agents run at once: each figure is that
process's own CPU time, which the others do not add to.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import yaml
from kubemeter.api.rendered import AgentConfig, GatewayConfig

from bench import plots
from bench.bench_operator import (
    RssSampler,
    api_client,
    check_alive,
    control_plane,
    cpu_seconds,
    kubemeter_process,
    mib,
    wait_until,
)
from testbed import realnode
from testbed.controlplane import REPO_ROOT, ControlPlane, FakeNode, free_port
from testbed.kubelet_endpoint import KubeletEndpoint

ABOUT = (
    "agent CPU and RSS at 110 pods (real kubelet on real-0), 250 and 500 (kwok, stand-in kubelet): "
    "the example's meters, a CEL filter, kubelet usage, churn"
)

EXAMPLE = REPO_ROOT / "examples" / "gpu-chargeback.yaml"
INTERVAL_S = 10
WINDOW_S = 60
MEASURE_S = float(os.environ.get("KUBEMETER_BENCH_AGENT_SECONDS", "70"))
CPU_GOAL_PERCENT = 1.0
RSS_GOAL_MIB = 64.0
REAL_NODE = realnode.NAME
POD_COUNTS = {REAL_NODE: 110, "bench-250": 250, "bench-500": 500}
STAND_IN_NODES = ("bench-250", "bench-500")
CHURN_EVERY_S = 2.0  # per node: one pod deleted and one created
STOPPING_ROOM = 10  # real-0's maxPods above the pods it holds
# The example's suggested filter: CEL's int/double typing needs the interpreter, not the fast paths.
CEL_FILTER = "double(event.data.value) > 0.0"
KUBELET_CORES = 0.25  # each stand-in pod's CPU use
KUBELET_WORKING_SET_BYTES = 100 * 2**20
CUSTOMERS = ["acme", "globex", "initech", "umbrella", "hooli"]
GPUS_PER_NODE = "64"
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
KWOK_REQUESTS = {"cpu": "250m", "memory": "256Mi"}
# 110 of these fit real-0's two cores and leave the machine's memory alone.
REAL_REQUESTS = {"cpu": "10m", "memory": "16Mi"}
# busybox as PID 1 ignores SIGTERM; the trap lets a graceful delete end the pod at once.
REAL_COMMAND = ["sh", "-c", "trap 'exit 0' TERM; sleep 86400 & wait"]


def bench_nodes() -> list[FakeNode]:
    def node(name: str, pods: int, address: str) -> FakeNode:
        capacity = {
            "cpu": "512",
            "memory": "4096Gi",
            "pods": str(pods),
            "ephemeral-storage": "8000Gi",
            "nvidia.com/gpu": GPUS_PER_NODE,
        }
        labels = {"nvidia.com/gpu.product": GPU_PRODUCT}
        return FakeNode(name, labels, capacity, address)

    # The 110-pod point is real-0; the larger kwok nodes carry their own pod capacity.
    return [node("bench-250", 256, "127.0.10.102"), node("bench-500", 512, "127.0.10.103")]


def pod_manifest(node: str, index: int, generation: int = 0) -> dict[str, Any]:
    requests = dict(REAL_REQUESTS if node == REAL_NODE else KWOK_REQUESTS)
    if index % 10 == 0:
        requests["nvidia.com/gpu"] = "1"
    container: dict[str, Any] = {
        "name": "main",
        "image": "registry.local/workload:1",
        "resources": {"requests": requests, "limits": requests},
    }
    manifest: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{node}-pod-{index}-{generation}",
            "namespace": CUSTOMERS[index % len(CUSTOMERS)],
            "labels": {"team": CUSTOMERS[index % len(CUSTOMERS)]},
        },
        "spec": {
            "nodeName": node,  # bound directly: this measures the agent, not the scheduler
            "containers": [container],
        },
    }
    if node == REAL_NODE:
        container.update(image=realnode.BUSYBOX_IMAGE, command=REAL_COMMAND)
        manifest["spec"]["terminationGracePeriodSeconds"] = 1
        realnode.on_real_node(manifest)
    return manifest


def start_real_node(plane: ControlPlane, state_dir: Path, stack: ExitStack) -> realnode.RealNode:
    """real-0 with room for 110 pods and GPUs advertised as an extended resource."""
    # Room above the 110 it holds for the churn's pods still stopping: the kubelet counts them, and
    # with maxPods 110 it refused new ones (OutOfpods) while a deleted pod took up to 10 s to stop.
    max_pods = POD_COUNTS[REAL_NODE] + STOPPING_ROOM
    node = realnode.RealNode(plane, state_dir, bin_dir=plane.bin_dir, max_pods=max_pods)
    stack.callback(node.stop)
    node.start()
    plane.kubectl("label", "node", REAL_NODE, f"nvidia.com/gpu.product={GPU_PRODUCT}")
    # What "advertise extended resources for a node" does: the kubelet keeps resources it does not
    # manage, and admits pods asking for them (no device plugin: no device is handed over).
    gpu = "/status/{}/nvidia.com~1gpu"
    patch = [
        {"op": "add", "path": gpu.format(key), "value": GPUS_PER_NODE} for key in ("capacity", "allocatable")
    ]
    plane.kubectl("patch", "node", REAL_NODE, "--subresource=status", "--type=json", "-p", json.dumps(patch))
    return node


def fill_nodes(plane: ControlPlane) -> float:
    """Every node's pods, applied at once; returns the seconds until all were Running."""
    for customer in CUSTOMERS:
        plane.kubectl("create", "namespace", customer)
        plane.kubectl("label", "namespace", customer, f"billing.kubemeter.io/customer={customer}")
    items = [pod_manifest(node, i) for node, count in POD_COUNTS.items() for i in range(count)]
    started = time.monotonic()
    plane.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        timeout_s=600,
    )

    def all_running() -> bool:
        pods = plane.get_json("pods", "--all-namespaces")["items"]
        failed = [p["metadata"]["name"] for p in pods if p["status"].get("phase") == "Failed"]
        if failed:
            raise RuntimeError(f"pods failed to start: {failed[:5]} ({len(failed)})")
        return sum(1 for p in pods if p["status"].get("phase") == "Running") >= len(items)

    wait_until(all_running, 600, 2.0, f"{len(items)} pods Running")
    return time.monotonic() - started


class NodePods:
    """The pods each node holds now, as the API server answered: what the churn picks from and the
    stand-in kubelets serve."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pods: dict[str, dict[str, tuple[str, str, float]]] = {node: {} for node in POD_COUNTS}

    def add(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        with self._lock:
            self._pods[pod["spec"]["nodeName"]][meta["uid"]] = (meta["namespace"], meta["name"], time.time())

    def remove(self, node: str, uid: str) -> None:
        with self._lock:
            self._pods[node].pop(uid, None)

    def on(self, node: str) -> list[tuple[str, str, str, float]]:
        with self._lock:
            return [(uid, *rest) for uid, rest in self._pods[node].items()]


def rfc3339(moment_s: float) -> str:
    return datetime.fromtimestamp(moment_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def stand_in_kubelet(node: FakeNode, port: int, pods: NodePods, certdir: Path) -> KubeletEndpoint:
    """/stats/summary for the pods on ``node``: CPU counters that grow at :data:`KUBELET_CORES`."""

    def answer(path: str, authorization: str) -> tuple[int, str]:
        if not path.startswith("/stats/summary") or not authorization.startswith("Bearer "):
            return 403, "{}"
        now_s = time.time()
        summary_pods = [
            {
                "podRef": {"name": name, "namespace": namespace, "uid": uid},
                "startTime": rfc3339(started_s),
                "cpu": {
                    "time": rfc3339(now_s),
                    "usageNanoCores": int(KUBELET_CORES * 1e9),
                    "usageCoreNanoSeconds": int((now_s - started_s) * KUBELET_CORES * 1e9),
                },
                "memory": {
                    "time": rfc3339(now_s),
                    "workingSetBytes": KUBELET_WORKING_SET_BYTES,
                    "usageBytes": KUBELET_WORKING_SET_BYTES,
                },
                "containers": [],
            }
            for uid, namespace, name, started_s in pods.on(node.name)
        ]
        body = {"node": {"nodeName": node.name, "startTime": rfc3339(now_s - 3600)}, "pods": summary_pods}
        return 200, json.dumps(body)

    return KubeletEndpoint(node.internal_ip, port, certdir / node.name, answer)


class RealPodTimes:
    """A watch on real-0's pods: when each pod the churn created was first seen Running, and when
    each it deleted was gone from the API server (the kubelet had stopped its containers); seconds on
    the bench's clock from the churn's request."""

    def __init__(self, plane: ControlPlane) -> None:
        self.plane = plane
        self.created: dict[str, float] = {}
        self.deleted: dict[str, float] = {}
        self.start_s: dict[str, float] = {}
        self.stop_s: dict[str, float] = {}
        self.failed: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="real-pod-times", daemon=True)

    def __enter__(self) -> RealPodTimes:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def asked_to_create(self, name: str) -> None:
        with self._lock:
            self.created[name] = time.monotonic()

    def asked_to_delete(self, name: str) -> None:
        with self._lock:
            self.deleted[name] = time.monotonic()

    def _seen(self, kind: str, pod: dict[str, Any]) -> None:
        now = time.monotonic()
        name, status = pod["metadata"]["name"], pod.get("status", {})
        with self._lock:
            if kind == "DELETED" and name in self.deleted:
                self.stop_s.setdefault(name, now - self.deleted[name])
            elif status.get("phase") == "Running" and name in self.created:
                self.start_s.setdefault(name, now - self.created[name])
            elif status.get("phase") == "Failed" and name not in self.deleted:  # refused, e.g. OutOfpods
                self.failed[name] = status.get("reason", "")

    def _run(self) -> None:
        with api_client(self.plane) as client:
            listed = client.get("/api/v1/pods", params={"fieldSelector": f"spec.nodeName={REAL_NODE}"})
            version = listed.json()["metadata"]["resourceVersion"]
            while not self._stop.is_set():  # each watch ends after 5 s: the stop is seen that soon
                params = {
                    "watch": "true",
                    "fieldSelector": f"spec.nodeName={REAL_NODE}",
                    "resourceVersion": version,
                    "timeoutSeconds": "5",
                }
                try:
                    with client.stream("GET", "/api/v1/pods", params=params) as response:
                        for line in response.iter_lines():
                            if not line:
                                continue
                            event = json.loads(line)
                            if event["type"] == "ERROR":  # 410: start again from now
                                version = client.get("/api/v1/pods", params={"limit": "1"}).json()[
                                    "metadata"
                                ]["resourceVersion"]
                                break
                            version = event["object"]["metadata"]["resourceVersion"]
                            self._seen(event["type"], event["object"])
                except httpx.HTTPError:
                    self._stop.wait(0.5)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            starts, stops = sorted(self.start_s.values()), sorted(self.stop_s.values())
            return {
                "start_median_s": statistics.median(starts) if starts else 0.0,
                "start_max_s": max(starts, default=0.0),
                "started": len(starts),
                "stop_median_s": statistics.median(stops) if stops else 0.0,
                "stop_max_s": max(stops, default=0.0),
                "stopped": len(stops),
                "created": len(self.created),
                "deleted": len(self.deleted),
                "failed": dict(self.failed),
            }


class Churn:
    """Every :data:`CHURN_EVERY_S`, on each node: delete a random pod, create a new one. On real-0
    the delete is graceful (the kubelet stops the pod); kwok pods go at once."""

    def __init__(self, plane: ControlPlane, pods: NodePods, real: RealPodTimes) -> None:
        self.plane, self.pods, self.real = plane, pods, real
        self.created = self.deleted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="churn", daemon=True)

    def __enter__(self) -> Churn:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        rng = random.Random(16)
        generation = 0
        with api_client(self.plane) as client:
            while not self._stop.wait(CHURN_EVERY_S):
                generation += 1
                for node in POD_COUNTS:
                    held = self.pods.on(node)
                    if held:
                        uid, namespace, name, _ = rng.choice(held)
                        params = {} if node == REAL_NODE else {"gracePeriodSeconds": "0"}
                        if node == REAL_NODE:
                            self.real.asked_to_delete(name)
                        client.delete(f"/api/v1/namespaces/{namespace}/pods/{name}", params=params)
                        self.pods.remove(node, uid)
                        self.deleted += 1
                    manifest = pod_manifest(node, rng.randrange(10_000), generation)
                    namespace = manifest["metadata"]["namespace"]
                    if node == REAL_NODE:
                        self.real.asked_to_create(manifest["metadata"]["name"])
                    reply = client.post(f"/api/v1/namespaces/{namespace}/pods", json=manifest)
                    if reply.status_code == 201:
                        self.pods.add(reply.json())
                        self.created += 1


def example_meters() -> list[dict[str, Any]]:
    """The example's Meters, resolved as the operator renders them (with the Pipeline's processors)."""
    documents = list(yaml.safe_load_all(EXAMPLE.read_text()))
    (pipeline,) = [d for d in documents if d["kind"] == "Pipeline"]
    meters = [d for d in documents if d["kind"] == "Meter"]
    (cpu,) = [d for d in meters if d["metadata"]["name"] == "cpu-core-seconds"]
    kubelet = {
        "metadata": {"name": "cpu-usage-core-seconds"},
        "spec": {
            **cpu["spec"],
            "eventType": "cpu-usage-core-seconds",
            "source": {"kubeletUsage": {"metric": "cpu"}},
        },
    }
    processors = [*pipeline["spec"]["processors"], {"filter": CEL_FILTER}]
    return [
        {
            "name": d["metadata"]["name"],
            "namespace": "kubemeter",
            "uid": f"bench-{d['metadata']['name']}",
            "pipeline": pipeline["metadata"]["name"],
            "spec": d["spec"],
            "processors": processors,
        }
        for d in sorted([*meters, kubelet], key=lambda d: d["metadata"]["name"])
    ]


def write_gateway_config(directory: Path, sink_url: str) -> tuple[Path, str]:
    port = free_port()
    token = directory / "billing-token"
    token.write_text("replace-me\n")
    config = GatewayConfig.model_validate(
        {
            "cluster": "bench",
            "collector": "chargeback",
            "namespace": "kubemeter",
            "output": {
                "type": "openmeter",
                "url": sink_url,
                "batch": {"maxEvents": 500, "maxDelaySeconds": 1},
            },
            "credentialsFile": str(token),
            "bufferMaxBytes": 1 << 30,
            "dataDir": str(directory / "gateway"),
            "listenAddress": f"127.0.0.1:{port}",
        }
    )
    path = directory / "gateway.yaml"
    path.write_text(config.to_yaml())
    return path, f"http://127.0.0.1:{port}"


def write_agent_config(directory: Path, gateway_url: str) -> tuple[Path, int]:
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    config = AgentConfig.model_validate(
        {
            "cluster": "bench",
            "collector": "chargeback",
            "namespace": "kubemeter",
            "meters": example_meters(),
            "gatewayUrl": gateway_url,
            "intervalSeconds": INTERVAL_S,
            "spoolDir": str(directory / "spool"),
            "checkpointDir": str(directory / "checkpoints"),
            "metricsPort": port,
        }
    )
    path = directory / "agent.yaml"
    path.write_text(config.to_yaml())
    return path, port


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def events_emitted(metrics_port: int, meter: str | None = None) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("kubemeter_agent_events_emitted_total") and (meter is None or f'{meter}"' in line)
    )


def celpy_loaded(pid: int) -> bool:
    """Whether the agent loaded the CEL interpreter: celpy.evaluation imports google-re2, whose C
    extension then shows in the process's memory map (nothing else in the agent uses re2)."""
    return "/re2/_re2" in Path(f"/proc/{pid}/maps").read_text()


def kubelet_ca(node: str, plane: ControlPlane, stand_ins: dict[str, KubeletEndpoint]) -> str:
    """The CA the node's agent verifies its kubelet with: the testbed CA signed real-0's serving
    certificate; each stand-in made its own."""
    return str(plane.ca.cert if node == REAL_NODE else stand_ins[node].cert)


def measure(state_dir: Path) -> dict[str, Any]:
    with ExitStack() as stack:
        plane = stack.enter_context(control_plane(state_dir / "cluster", nodes=bench_nodes()))
        real = start_real_node(plane, state_dir / "real-node", stack)
        fill_s = fill_nodes(plane)
        pods = NodePods()
        for pod in plane.get_json("pods", "--all-namespaces")["items"]:
            if pod["spec"].get("nodeName") in POD_COUNTS:
                pods.add(pod)
        stand_ins = {
            node.name: stand_in_kubelet(node, plane.kubelet_ports[node.name], pods, state_dir / "pki")
            for node in plane.nodes
            if node.name in STAND_IN_NODES
        }
        for endpoint in stand_ins.values():
            stack.callback(endpoint.stop)
        real_times = stack.enter_context(RealPodTimes(plane))
        churn = stack.enter_context(Churn(plane, pods, real_times))
        logs = state_dir / "logs"
        logs.mkdir()
        sink_port = free_port()
        sink_args = ["sink", "--host", "127.0.0.1", "--port", str(sink_port)]
        sink = stack.enter_context(
            kubemeter_process([*sink_args, "--data-dir", str(state_dir / "sink")], logs / "sink.log")
        )
        sink_url = f"http://127.0.0.1:{sink_port}"
        wait_until(lambda: answers(f"{sink_url}/healthz"), 30, 0.2, "kubemeter sink")
        gateway_config, gateway_url = write_gateway_config(state_dir, sink_url)
        gateway = stack.enter_context(
            kubemeter_process(["gateway", "--config", str(gateway_config)], logs / "gateway.log")
        )
        wait_until(lambda: answers(f"{gateway_url}/readyz"), 30, 0.2, "kubemeter gateway")
        agents: dict[str, tuple[Any, int, Path]] = {}
        for node in POD_COUNTS:
            config, port = write_agent_config(state_dir / "agents" / node, gateway_url)
            log = logs / f"agent-{node}.log"
            args = [
                "agent",
                "--config",
                str(config),
                "--node-name",
                node,
                "--kubeconfig",
                str(plane.kubeconfig),
            ]
            env = {"KUBEMETER_KUBELET_CA_FILE": kubelet_ca(node, plane, stand_ins)}
            process = stack.enter_context(kubemeter_process(args, log, env))
            agents[node] = (process, port, log)
        for process, port, log in agents.values():
            check_alive(process, log)
            wait_until(partial(answers, f"http://127.0.0.1:{port}/healthz"), 60, 0.2, "agent health")
        time.sleep(2 * INTERVAL_S)  # warm-up: the first full reads are start-up, not steady state
        samplers = {node: stack.enter_context(RssSampler(p.pid)) for node, (p, _, _) in agents.items()}
        cpu_before = {node: cpu_seconds(p.pid) for node, (p, _, _) in agents.items()}
        started = time.monotonic()
        while time.monotonic() - started < MEASURE_S:
            for process, _, log in agents.values():
                check_alive(process, log)
            for name, process in (("sink", sink), ("gateway", gateway)):
                check_alive(process, logs / f"{name}.log")
            if real.failed_components():
                raise realnode.RealNodeError(f"real-0 lost a part:\n{real.logs_report()}")
            time.sleep(1.0)
        elapsed_s = time.monotonic() - started
        results: dict[str, Any] = {}
        for node, (process, port, _) in agents.items():
            results[node] = {
                "cpu_percent": (cpu_seconds(process.pid) - cpu_before[node]) / elapsed_s * 100,
                "rss_peak": samplers[node].peak_bytes,
                "events": events_emitted(port),
                "celpy_loaded": celpy_loaded(process.pid),
                "kubelet_events": events_emitted(port, "cpu-usage-core-seconds"),
            }
        real_pods = [
            p
            for p in plane.get_json("pods", "--all-namespaces")["items"]
            if p["spec"].get("nodeName") == REAL_NODE
        ]
        results["real"] = {
            **real_times.summary(),
            "fill_s": fill_s,
            "running": sum(1 for p in real_pods if p["status"].get("phase") == "Running"),
            "gpu_pods": sum(
                1
                for p in real_pods
                if p["status"].get("phase") == "Running"
                and "nvidia.com/gpu" in p["spec"]["containers"][0]["resources"].get("requests", {})
            ),
            "rss": real.rss_bytes(),
        }
        if os.environ.get("KUBEMETER_BENCH_KEEP_LOGS"):
            import shutil

            shutil.copytree(logs, os.environ["KUBEMETER_BENCH_KEEP_LOGS"], dirs_exist_ok=True)
        results["churn"] = {"created": churn.created, "deleted": churn.deleted, "seconds": elapsed_s}
        return results


def kubelet_kind(node: str) -> str:
    return "real kubelet, real-0" if node == REAL_NODE else "stand-in kubelet, kwok node"


def run() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="kubemeter-bench-agent-") as scratch:
        results = measure(Path(scratch))
    churn, real = results["churn"], results["real"]
    figures: list[dict[str, Any]] = []
    for node, pods in POD_COUNTS.items():
        measured = results[node]
        at_goal = pods == 110
        cpu_goal = f"goal <= {CPU_GOAL_PERCENT}% at 110 pods" if at_goal else "agent/110-pods/cpu"
        rss_goal = f"goal <= {RSS_GOAL_MIB:.0f} MiB at 110 pods" if at_goal else "agent/110-pods/rss-peak"
        celpy = "CEL interpreter loaded" if measured["celpy_loaded"] else "CEL interpreter NOT loaded"
        kind = kubelet_kind(node)
        figures += [
            {
                "name": f"agent/{pods}-pods/cpu",
                "value": round(measured["cpu_percent"], 2),
                "unit": f"% of one core ({kind}; {INTERVAL_S} s interval, {MEASURE_S:.0f} s measured, "
                f"{celpy})",
                "baseline": cpu_goal,
            },
            {
                "name": f"agent/{pods}-pods/rss-peak",
                "value": mib(measured["rss_peak"]),
                "unit": f"MiB ({kind}; {celpy})",
                "baseline": rss_goal,
            },
            {
                "name": f"agent/{pods}-pods/events-emitted",
                "value": int(measured["events"]),
                "unit": f"events since start, {int(measured['kubelet_events'])} of them kubelet usage",
                "baseline": "sanity: more than 0, windows closed and written",
            },
        ]
    failed = real["failed"]
    refused = f": {sorted(set(failed.values()))}" if failed else ""
    shims = sum(1 for k in real["rss"] if k.startswith("shim-"))
    figures += [
        {
            "name": "agent/churn",
            "value": churn["created"] + churn["deleted"],
            "unit": f"pods created and deleted over the run ({churn['created']} created)",
            "baseline": f"{len(POD_COUNTS)} nodes x 2 every {CHURN_EVERY_S:.0f} s",
        },
        {
            "name": "agent/real-0/pods-running",
            "value": real["running"],
            "unit": (
                f"busybox pods Running on real-0 at the end ({real['gpu_pods']} with a GPU; "
                f"{len(failed)} refused by the kubelet{refused})"
            ),
            "baseline": f"{POD_COUNTS[REAL_NODE]} held (maxPods {POD_COUNTS[REAL_NODE] + STOPPING_ROOM})",
        },
        {
            "name": "agent/real-0/fill",
            "value": round(real["fill_s"], 1),
            "unit": f"s from applying every node's pods until all ran ({POD_COUNTS[REAL_NODE]} on real-0)",
            "baseline": "measured, no goal",
        },
        {
            "name": "agent/real-0/pod-start",
            "value": round(real["start_median_s"], 2),
            "unit": (
                f"s median from POST to Running (watch) of {real['started']} churned pods "
                f"(max {real['start_max_s']:.2f} s)"
            ),
            "baseline": f"churn period {CHURN_EVERY_S:.0f} s",
        },
        {
            "name": "agent/real-0/pod-stop",
            "value": round(real["stop_median_s"], 2),
            "unit": (
                f"s median from a graceful DELETE to the pod gone (watch) of {real['stopped']} pods "
                f"(max {real['stop_max_s']:.2f} s)"
            ),
            "baseline": f"churn period {CHURN_EVERY_S:.0f} s",
        },
        {
            "name": "agent/real-0/node-rss",
            "value": mib(sum(real["rss"].values())),
            "unit": (
                f"MiB: kubelet {mib(real['rss'].get('kubelet', 0))}, containerd "
                f"{mib(real['rss'].get('containerd', 0))}, {shims} shims"
            ),
            "baseline": "context: the node's own cost beside the agent's",
        },
    ]
    plots.line_plot(
        "agent-cpu-vs-pods",
        "Agent CPU vs pods (110: real kubelet on real-0; 250, 500: kwok + stand-in kubelet)",
        "pods on the node",
        "% of one core",
        {"kubemeter agent": [(n, results[node]["cpu_percent"]) for node, n in POD_COUNTS.items()]},
    )
    plots.line_plot(
        "agent-rss-vs-pods",
        "Agent peak RSS vs pods (CEL loaded; 110: real kubelet, 250/500: stand-in)",
        "pods on the node",
        "MiB",
        {"kubemeter agent": [(n, results[node]["rss_peak"] / 2**20) for node, n in POD_COUNTS.items()]},
    )
    return figures
