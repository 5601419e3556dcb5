"""Agent CPU and memory on the example's real configuration, with pods churning (issues 4 and 16).

The local control plane runs three kwok nodes, ``bench-110`` (``pods: 110``, the kubelet default),
``bench-250`` and ``bench-500``, filled with that many Running pods (CPU and memory requests; every
tenth pod also holds a GPU) across five customer namespaces. All through warm-up and measurement a
churn thread deletes a random pod of each node and creates a new one every :data:`CHURN_EVERY_S`.

One ``kubemeter agent`` per node runs the three Meters of ``examples/gpu-chargeback.yaml`` (GPU, CPU,
memory allocation, with their CEL subject, dimensions and the Pipeline's set/drop) plus a kubelet
usage Meter (``kubeletUsage: cpu``), and the Pipeline's processors gain the filter the example
suggests, ``double(event.data.value) > 0.0``, which needs the CEL interpreter (celpy): it is loaded in
every agent measured here. Each node's kubelet is a stand-in (``tests/support/kubelet_endpoint.py``,
TLS and a bearer token, where the Node says its kubelet is) serving ``/stats/summary`` for the pods
the node holds at that moment, with cumulative CPU counters. Intervals of 10 s, 60 s windows, the
real spool forwarding to a ``kubemeter gateway`` that delivers to ``kubemeter sink``.

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
import tempfile
import threading
import time
import urllib.request
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
from testbed.controlplane import REPO_ROOT, ControlPlane, FakeNode, free_port
from tests.support.kubelet_endpoint import KubeletEndpoint

ABOUT = "agent CPU and RSS at 110, 250, 500 pods: the example's meters, a CEL filter, kubelet usage, churn"

EXAMPLE = REPO_ROOT / "examples" / "gpu-chargeback.yaml"
INTERVAL_S = 10
WINDOW_S = 60
MEASURE_S = float(os.environ.get("KUBEMETER_BENCH_AGENT_SECONDS", "70"))
CPU_GOAL_PERCENT = 1.0
RSS_GOAL_MIB = 64.0
POD_COUNTS = {"bench-110": 110, "bench-250": 250, "bench-500": 500}
CHURN_EVERY_S = 2.0  # per node: one pod deleted and one created
# The example's suggested filter: CEL's int/double typing needs the interpreter, not the fast paths.
CEL_FILTER = "double(event.data.value) > 0.0"
KUBELET_CORES = 0.25  # each stand-in pod's CPU use
KUBELET_WORKING_SET_BYTES = 100 * 2**20
CUSTOMERS = ["acme", "globex", "initech", "umbrella", "hooli"]


def bench_nodes() -> list[FakeNode]:
    def node(name: str, pods: int, address: str) -> FakeNode:
        capacity = {
            "cpu": "512",
            "memory": "4096Gi",
            "pods": str(pods),
            "ephemeral-storage": "8000Gi",
            "nvidia.com/gpu": "64",
        }
        labels = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        return FakeNode(name, labels, capacity, address)

    # A kwok node carries pods: 110 like a default kubelet; the larger nodes need their own capacity.
    return [
        node("bench-110", 110, "127.0.10.101"),
        node("bench-250", 256, "127.0.10.102"),
        node("bench-500", 512, "127.0.10.103"),
    ]


def pod_manifest(node: str, index: int, generation: int = 0) -> dict[str, Any]:
    requests = {"cpu": "250m", "memory": "256Mi"}
    if index % 10 == 0:
        requests["nvidia.com/gpu"] = "1"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{node}-pod-{index}-{generation}",
            "namespace": CUSTOMERS[index % len(CUSTOMERS)],
            "labels": {"team": CUSTOMERS[index % len(CUSTOMERS)]},
        },
        "spec": {
            "nodeName": node,  # bound directly: this measures the agent, not the scheduler
            "containers": [
                {
                    "name": "main",
                    "image": "registry.local/workload:1",
                    "resources": {"requests": requests, "limits": requests},
                }
            ],
        },
    }


def fill_nodes(plane: ControlPlane) -> None:
    for customer in CUSTOMERS:
        plane.kubectl("create", "namespace", customer)
        plane.kubectl("label", "namespace", customer, f"billing.kubemeter.io/customer={customer}")
    items = [pod_manifest(node, i) for node, count in POD_COUNTS.items() for i in range(count)]
    plane.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        timeout_s=600,
    )

    def all_running() -> bool:
        pods = plane.get_json("pods", "--all-namespaces")["items"]
        return sum(1 for p in pods if p["status"].get("phase") == "Running") >= len(items)

    wait_until(all_running, 300, 1.0, f"{len(items)} pods Running")


class NodePods:
    """The pods each node holds now, as the API server answered: what the stand-in kubelets serve."""

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


class Churn:
    """Every :data:`CHURN_EVERY_S`, on each node: delete a random pod, create a new one."""

    def __init__(self, plane: ControlPlane, pods: NodePods) -> None:
        self.plane, self.pods = plane, pods
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
                        client.delete(
                            f"/api/v1/namespaces/{namespace}/pods/{name}", params={"gracePeriodSeconds": "0"}
                        )
                        self.pods.remove(node, uid)
                        self.deleted += 1
                    manifest = pod_manifest(node, rng.randrange(10_000), generation)
                    namespace = manifest["metadata"]["namespace"]
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


def measure(state_dir: Path) -> dict[str, Any]:
    with ExitStack() as stack:
        plane = stack.enter_context(control_plane(state_dir / "cluster", nodes=bench_nodes()))
        fill_nodes(plane)
        pods = NodePods()
        for pod in plane.get_json("pods", "--all-namespaces")["items"]:
            if pod["spec"].get("nodeName") in POD_COUNTS:
                pods.add(pod)
        kubelets = {
            node.name: stand_in_kubelet(node, plane.kubelet_ports[node.name], pods, state_dir / "pki")
            for node in plane.nodes
            if node.name in POD_COUNTS
        }
        for endpoint in kubelets.values():
            stack.callback(endpoint.stop)
        churn = stack.enter_context(Churn(plane, pods))
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
            env = {"KUBEMETER_KUBELET_CA_FILE": str(kubelets[node].cert)}
            process = stack.enter_context(kubemeter_process(args, log, env))
            agents[node] = (process, port, log)
        for process, port, log in agents.values():
            check_alive(process, log)
            wait_until(lambda port=port: answers(f"http://127.0.0.1:{port}/healthz"), 60, 0.2, "agent health")
        time.sleep(2 * INTERVAL_S)  # warm-up: the first full reads are start-up, not steady state
        samplers = {node: stack.enter_context(RssSampler(p.pid)) for node, (p, _, _) in agents.items()}
        cpu_before = {node: cpu_seconds(p.pid) for node, (p, _, _) in agents.items()}
        started = time.monotonic()
        while time.monotonic() - started < MEASURE_S:
            for process, _, log in agents.values():
                check_alive(process, log)
            for name, process in (("sink", sink), ("gateway", gateway)):
                check_alive(process, logs / f"{name}.log")
            time.sleep(1.0)
        elapsed_s = time.monotonic() - started
        results = {}
        for node, (process, port, _) in agents.items():
            results[node] = {
                "cpu_percent": (cpu_seconds(process.pid) - cpu_before[node]) / elapsed_s * 100,
                "rss_peak": samplers[node].peak_bytes,
                "events": events_emitted(port),
                "celpy_loaded": celpy_loaded(process.pid),
                "kubelet_events": events_emitted(port, "cpu-usage-core-seconds"),
            }
        if os.environ.get("KUBEMETER_BENCH_KEEP_LOGS"):
            import shutil

            shutil.copytree(logs, os.environ["KUBEMETER_BENCH_KEEP_LOGS"], dirs_exist_ok=True)
        results["churn"] = {"created": churn.created, "deleted": churn.deleted, "seconds": elapsed_s}
        return results


def run() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="kubemeter-bench-agent-") as scratch:
        results = measure(Path(scratch))
    churn = results["churn"]
    figures: list[dict[str, Any]] = []
    for node, pods in POD_COUNTS.items():
        measured = results[node]
        at_goal = pods == 110
        cpu_goal = f"goal <= {CPU_GOAL_PERCENT}% at 110 pods" if at_goal else "agent/110-pods/cpu"
        rss_goal = f"goal <= {RSS_GOAL_MIB:.0f} MiB at 110 pods" if at_goal else "agent/110-pods/rss-peak"
        celpy = "CEL interpreter loaded" if measured["celpy_loaded"] else "CEL interpreter NOT loaded"
        figures += [
            {
                "name": f"agent/{pods}-pods/cpu",
                "value": round(measured["cpu_percent"], 2),
                "unit": f"% of one core ({INTERVAL_S} s interval, {MEASURE_S:.0f} s measured, {celpy})",
                "baseline": cpu_goal,
            },
            {
                "name": f"agent/{pods}-pods/rss-peak",
                "value": mib(measured["rss_peak"]),
                "unit": f"MiB ({celpy})",
                "baseline": rss_goal,
            },
            {
                "name": f"agent/{pods}-pods/events-emitted",
                "value": int(measured["events"]),
                "unit": f"events since start, {int(measured['kubelet_events'])} of them kubelet usage",
                "baseline": "sanity: more than 0, windows closed and written",
            },
        ]
    figures.append(
        {
            "name": "agent/churn",
            "value": churn["created"] + churn["deleted"],
            "unit": f"pods created and deleted over the run ({churn['created']} created)",
            "baseline": f"{len(POD_COUNTS)} nodes x 2 every {CHURN_EVERY_S:.0f} s",
        }
    )
    plots.line_plot(
        "agent-cpu-vs-pods",
        "Agent CPU vs pods on the node (example meters + CEL filter + kubelet, churn)",
        "pods on the node",
        "% of one core",
        {"kubemeter agent": [(n, results[node]["cpu_percent"]) for node, n in POD_COUNTS.items()]},
    )
    plots.line_plot(
        "agent-rss-vs-pods",
        "Agent peak RSS vs pods on the node (CEL interpreter loaded)",
        "pods on the node",
        "MiB",
        {"kubemeter agent": [(n, results[node]["rss_peak"] / 2**20) for node, n in POD_COUNTS.items()]},
    )
    return figures
