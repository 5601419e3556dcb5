"""Agent CPU and memory with 110 and with 500 pods on one node (issue 4).

The local control plane runs two kwok nodes, ``bench-110`` (``pods: 110``, the kubelet default) and
``bench-500`` (``pods: 512``), filled with 110 and 500 Running pods (CPU and memory requests; every
tenth pod also holds a GPU) across five customer namespaces. One ``kubemeter agent`` per node runs the
three Meters of ``examples/gpu-chargeback.yaml`` (GPU, CPU, memory allocation, with their CEL subject,
dimensions and Pipeline processors) at ``intervalSeconds: 10`` and forwards through its spool to a
``kubemeter gateway`` that delivers to ``kubemeter sink``, all local processes.

After a warm-up (health endpoint up, then two intervals), each agent's CPU is read from
``/proc/<pid>/stat`` (utime + stime) at the start and end of a measured period that spans a clock-
aligned 60 s window boundary, so closing windows and emitting events are in the figure; RSS
(``/proc/<pid>/status`` VmRSS) is sampled every 100 ms. Both agents run at once: each figure is that
process's own CPU time, which the other does not add to.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml
from kubemeter.api.rendered import AgentConfig, GatewayConfig

from bench.bench_operator import (
    RssSampler,
    check_alive,
    control_plane,
    cpu_seconds,
    kubemeter_process,
    mib,
    wait_until,
)
from testbed.controlplane import REPO_ROOT, ControlPlane, FakeNode, free_port

ABOUT = "agent CPU and RSS at 110 and 500 pods per node"

EXAMPLE = REPO_ROOT / "examples" / "gpu-chargeback.yaml"
INTERVAL_S = 10
WINDOW_S = 60
MEASURE_S = float(os.environ.get("KUBEMETER_BENCH_AGENT_SECONDS", "70"))
CPU_GOAL_PERCENT = 2.0
RSS_GOAL_MIB = 64.0
POD_COUNTS = {"bench-110": 110, "bench-500": 500}
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

    # A kwok node carries pods: 110 like a default kubelet; the 500-pod node needs its own capacity.
    return [node("bench-110", 110, "127.0.10.101"), node("bench-500", 512, "127.0.10.102")]


def pod_manifest(node: str, index: int) -> dict[str, Any]:
    requests = {"cpu": "250m", "memory": "256Mi"}
    if index % 10 == 0:
        requests["nvidia.com/gpu"] = "1"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{node}-pod-{index}",
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
    plane.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))

    def all_running() -> bool:
        pods = plane.get_json("pods", "--all-namespaces")["items"]
        return sum(1 for p in pods if p["status"].get("phase") == "Running") >= len(items)

    wait_until(all_running, 120, 1.0, f"{len(items)} pods Running")


def example_meters() -> list[dict[str, Any]]:
    """The example's Meters, resolved as the operator renders them (with the Pipeline's processors)."""
    documents = list(yaml.safe_load_all(EXAMPLE.read_text()))
    (pipeline,) = [d for d in documents if d["kind"] == "Pipeline"]
    return [
        {
            "name": d["metadata"]["name"],
            "namespace": "kubemeter",
            "uid": f"bench-{d['metadata']['name']}",
            "pipeline": pipeline["metadata"]["name"],
            "spec": d["spec"],
            "processors": pipeline["spec"]["processors"],
        }
        for d in sorted(documents, key=lambda d: d["metadata"]["name"])
        if d["kind"] == "Meter"
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


def events_emitted(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("kubemeter_agent_events_emitted_total")
    )


def measure(state_dir: Path) -> dict[str, Any]:
    with ExitStack() as stack:
        plane = stack.enter_context(control_plane(state_dir / "cluster", nodes=bench_nodes()))
        fill_nodes(plane)
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
            process = stack.enter_context(kubemeter_process(args, log))
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
            }
        return results


def run() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="kubemeter-bench-agent-") as scratch:
        results = measure(Path(scratch))
    figures: list[dict[str, Any]] = []
    for node, pods in POD_COUNTS.items():
        measured = results[node]
        cpu_goal = f"goal < {CPU_GOAL_PERCENT}% at 110 pods" if pods == 110 else "no goal; 110-pod goal 2%"
        rss_goal = (
            f"goal < {RSS_GOAL_MIB:.0f} MiB at 110 pods" if pods == 110 else "no goal; 110-pod goal 64 MiB"
        )
        figures += [
            {
                "name": f"agent/{pods}-pods/cpu",
                "value": round(measured["cpu_percent"], 2),
                "unit": f"% of one core ({INTERVAL_S} s interval, {MEASURE_S:.0f} s measured)",
                "baseline": cpu_goal,
            },
            {
                "name": f"agent/{pods}-pods/rss-peak",
                "value": mib(measured["rss_peak"]),
                "unit": "MiB",
                "baseline": rss_goal,
            },
            {
                "name": f"agent/{pods}-pods/events-emitted",
                "value": int(measured["events"]),
                "unit": "events since start (sanity: windows closed and written)",
                "baseline": None,
            },
        ]
    return figures
