"""NVML, Prometheus and Run:ai through the whole agent: a real ``kubemeter agent`` process on a node of
the local control plane, a Meter per source, and the events it writes checked to the exact value.

- NVML: the fake at the pynvml boundary inside the agent, a real gRPC PodResources server on a unix
  socket, and a host ``/proc`` whose cgroup files name the real pods' UIDs.
- Prometheus: a real Prometheus scraping the dcgm-exporter stand-in with known values.
- Run:ai: the emulator of its documented endpoints, with an outage the agent back-fills.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from kubemeter.sources.podresources.generated import api_pb2 as pb
from kubemeter.sources.podresources.generated import api_pb2_grpc as pb_grpc

from testbed.controlplane import ControlPlane, FakeNode, wait_for
from tests.integration.agent.agent_harness import AgentProcess, exact, meter
from tests.plugins.prometheus import PrometheusFactory
from tests.support.dcgm_exporter import DcgmExporter, Gpu
from tests.support.runai_emulator import RunaiEmulator

pytestmark = pytest.mark.integration

WINDOW_S = 10
Events = list[dict[str, Any]]


def cpu_node(cluster: ControlPlane) -> FakeNode:
    return next(n for n in cluster.nodes if "nvidia.com/gpu" not in n.capacity)


def create_pods(cluster: ControlPlane, namespace: str, node: str, *names: str) -> dict[str, str]:
    """name → uid of running pods bound to ``node``."""
    for name in names:
        manifest = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "nodeName": node,
                "containers": [{"name": "main", "image": "fake", "resources": {"requests": {"cpu": "250m"}}}],
            },
        }
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    return {name: cluster.get_json("pod", name, "-n", namespace)["metadata"]["uid"] for name in names}


def start_agent(
    workdir: Path,
    node: str,
    cluster: ControlPlane,
    meters: list[dict[str, Any]],
    config: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> AgentProcess:
    agent = AgentProcess(workdir, node, cluster.kubeconfig, meters, env=env)
    if config:
        merged = {**yaml.safe_load(agent.config_path.read_text()), **config}
        agent.config_path.write_text(yaml.safe_dump(merged))
    agent.start()
    return agent


def full_windows(agent: AgentProcess, event_type: str, count: int, timeout_s: float = 90) -> Events:
    """Events of ``event_type``, once ``count`` windows after the agent's first (partial) one closed."""

    def enough() -> Events | None:
        events = [e for e in agent.events() if e["type"] == event_type]
        starts = sorted({e["data"]["window_start"] for e in events})
        if len(starts) < count + 1:
            return None
        return [e for e in events if e["data"]["window_start"] in starts[1 : count + 1]]

    found: Events = wait_for(enough, timeout_s=timeout_s, what=f"{count} full windows of {event_type}")
    return found


def healthz(agent: AgentProcess) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{agent.port}/healthz", timeout=2) as response:
            body: dict[str, Any] = json.loads(response.read())
            return body
    except urllib.error.HTTPError as error:
        failed: dict[str, Any] = json.loads(error.read())
        return failed


# ---- NVML ---------------------------------------------------------------------------------------


class StaticKubelet(pb_grpc.PodResourcesListerServicer):  # type: ignore[misc]
    """A kubelet's PodResources service on a unix socket, serving fixed allocations."""

    def __init__(self, pods: list[Any]) -> None:
        self.pods = pods
        self.lists = 0

    def List(self, request: Any, context: Any) -> Any:
        self.lists += 1
        return pb.ListPodResourcesResponse(pod_resources=self.pods)

    def GetAllocatableResources(self, request: Any, context: Any) -> Any:
        return pb.AllocatableResourcesResponse()


def holding(namespace: str, name: str, *device_ids: str) -> Any:
    return pb.PodResources(
        name=name,
        namespace=namespace,
        containers=[
            pb.ContainerResources(
                name="main",
                devices=[pb.ContainerDevices(resource_name="nvidia.com/gpu", device_ids=list(device_ids))],
            )
        ],
    )


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A unix socket path must stay under 108 bytes; pytest's tmp_path can be longer."""
    directory = Path(tempfile.mkdtemp(prefix="km-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_nvml_meter_bills_an_exclusive_gpu_exactly_and_splits_a_shared_one_by_process_samples(
    cluster: ControlPlane, namespace: str, tmp_path: Path, short_dir: Path
) -> None:
    node = cpu_node(cluster)
    uids = create_pods(cluster, namespace, node.name, "train-a", "infer-b")
    # Host /proc: pid 100 runs in train-a (systemd driver, cgroup v2), pid 200 in infer-b (cgroupfs, v1).
    proc = tmp_path / "proc"
    systemd_uid = uids["train-a"].replace("-", "_")
    for pid, cgroup in {
        100: f"0::/kubepods.slice/kubepods-pod{systemd_uid}.slice/cri-containerd-1.scope",
        200: f"5:memory:/kubepods/besteffort/pod{uids['infer-b']}/2",
    }.items():
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "cgroup").write_text(cgroup + "\n")
    gpus = [
        {"uuid": "GPU-excl", "utilization_percent": 50, "processes": [[100, 2**30]], "busy": {"100": 50}},
        {
            "uuid": "GPU-shared",
            "name": "NVIDIA L4",
            "utilization_percent": 80,
            "processes": [[100, 2**30], [200, 2**29]],
            "busy": {"100": 30, "200": 10},
        },
    ]
    (tmp_path / "gpus.json").write_text(json.dumps(gpus))
    kubelet = StaticKubelet(
        [
            holding(namespace, "train-a", "GPU-excl", "GPU-shared::0"),
            holding(namespace, "infer-b", "GPU-shared::1"),
        ]
    )
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_PodResourcesListerServicer_to_server(kubelet, server)
    socket_path = short_dir / "kubelet.sock"
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    agent = start_agent(
        tmp_path / "agent",
        node.name,
        cluster,
        [meter("gpu-busy-seconds", "m-nvml", namespace, {"nvml": {"metric": "utilization"}})],
        config={"podResourcesSocket": str(socket_path), "hostProcDir": str(proc)},
        env={"KUBEMETER_TEST_FAKE_NVML": str(tmp_path / "gpus.json")},
    )
    try:
        events = full_windows(agent, "gpu-busy-seconds", 3)
        by_pod_and_gpu: dict[tuple[str, str], list[tuple[Decimal, bool, str]]] = defaultdict(list)
        for event in events:
            data = event["data"]
            by_pod_and_gpu[(data["pod"], data["gpu"])].append(
                (exact(data["value"]), data["complete"], data["attribution"])
            )
        complete = {key: [v for v, ok, _ in values if ok] for key, values in by_pod_and_gpu.items()}
        # 50 % busy for 10 s is 5 GPU-seconds; the shared GPU's 80 % split 30:10 by SM samples.
        assert {key: set(values) for key, values in complete.items()} == {
            ("train-a", "GPU-excl"): {Decimal(5)},
            ("train-a", "GPU-shared"): {Decimal(6)},
            ("infer-b", "GPU-shared"): {Decimal(2)},
        }
        assert all(len(values) >= 2 for values in complete.values()), by_pod_and_gpu
        attributions = {key: {a for _, _, a in values} for key, values in by_pod_and_gpu.items()}
        assert attributions == {
            ("train-a", "GPU-excl"): {"exclusive"},
            ("train-a", "GPU-shared"): {"process-share"},
            ("infer-b", "GPU-shared"): {"process-share"},
        }
        models = {e["data"]["gpu"]: e["data"]["gpu_model"] for e in events}
        assert models == {"GPU-excl": "NVIDIA H100 80GB HBM3", "GPU-shared": "NVIDIA L4"}
        # One event per pod, device and window: the device is part of the id.
        assert len({e["id"] for e in events}) == len(events)
        assert kubelet.lists > 0 and healthz(agent)["sourceFaults"] == {}
    finally:
        agent.stop()
        server.stop(grace=None)


def test_nvml_on_a_node_without_the_driver_reports_once_and_does_not_crash_loop(
    cluster: ControlPlane, namespace: str, tmp_path: Path, short_dir: Path
) -> None:
    node = cpu_node(cluster)
    create_pods(cluster, namespace, node.name, "train-a")
    kubelet = StaticKubelet([holding(namespace, "train-a", "GPU-x")])
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_PodResourcesListerServicer_to_server(kubelet, server)
    socket_path = short_dir / "kubelet.sock"
    server.add_insecure_port(f"unix://{socket_path}")
    server.start()
    # No fake installed and no GPU on this machine: the real pynvml finds no libnvidia-ml.
    agent = start_agent(
        tmp_path / "agent",
        node.name,
        cluster,
        [
            meter("gpu-energy", "m-nvml-e", namespace, {"nvml": {"metric": "energy"}}),
            meter("cpu-seconds", "m-alloc", namespace, {"allocation": {"resource": "cpu"}}),
        ],
        config={"podResourcesSocket": str(socket_path)},
        env={"KUBEMETER_TEST_FAKE_NVML": ""},
    )
    try:
        fault = wait_for(
            lambda: (healthz(agent).get("sourceFaults") or {}).get("kubemeter-system/gpu-energy"),
            timeout_s=30,
            what="the NVML fault",
        )
        print(f"source faults: {healthz(agent).get('sourceFaults')}")
        assert "nvml unavailable" in fault
        assert "NVIDIA container runtime" in fault
        full_windows(agent, "cpu-seconds", 2)  # the other meter goes on
        # The pod holding a GPU gets its windows closed flagged (after the agent held them a while).
        flagged = wait_for(
            lambda: [e for e in agent.events() if e["type"] == "gpu-energy"] or None,
            timeout_s=60,
            what="the flagged NVML windows",
        )
        assert all(not e["data"]["complete"] for e in flagged)
        assert "NVML not read" in flagged[0]["data"]["incomplete_reason"]
        assert 'kubemeter_agent_source_faulted{meter="kubemeter-system/gpu-energy"} 1.0' in agent.metrics()
        assert agent.process is not None and agent.process.poll() is None
        log = agent.log_path.read_text()
        assert log.count("nvml unavailable") == 1, "logged once per outage, not every pass"
    finally:
        agent.stop()
        server.stop(grace=None)


# ---- Prometheus ---------------------------------------------------------------------------------


def test_prometheus_meters_bill_dcgm_busy_seconds_and_joules_exactly_and_a_bad_query_fails_alone(
    cluster: ControlPlane, namespace: str, tmp_path: Path, prometheus_server: PrometheusFactory
) -> None:
    node = cpu_node(cluster)
    create_pods(cluster, namespace, node.name, "train-0")
    exporter = DcgmExporter(
        [
            Gpu(0, "GPU-a", node.name, "0.75", watts=300, namespace=namespace, pod="train-0"),
            Gpu(1, "GPU-c", node.name, "0.5", watts=60),  # unallocated: nobody's usage
            Gpu(2, "GPU-d", "another-node", "1", watts=500, namespace=namespace, pod="train-0"),
        ]
    )
    url = prometheus_server(
        [{"job_name": "dcgm", "honor_labels": True, "static_configs": [{"targets": [exporter.target]}]}],
        scrape_interval_s=1.0,
    )
    wait_for(lambda: exporter.scrapes > 0, timeout_s=30, what="the first scrape")
    common = {"url": url, "nodeLabel": "Hostname", "scrapeIntervalSeconds": 1}
    meters = [
        meter(
            "gpu-busy-seconds",
            "m-prom-busy",
            namespace,
            {"prometheus": {**common, "query": "DCGM_FI_PROF_GR_ENGINE_ACTIVE", "kind": "gauge"}},
        ),
        meter(
            "gpu-joules",
            "m-prom-energy",
            namespace,
            {
                "prometheus": {
                    **common,
                    "query": 'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{pod!=""}',
                    "kind": "counter",
                    "valueScale": 0.001,
                    "headers": {"X-Scope-OrgID": "team-a"},
                }
            },
        ),
        meter(
            "broken",
            "m-prom-broken",
            namespace,
            {"prometheus": {**common, "query": "rate(DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION[1m])"}},
        ),
    ]
    agent = start_agent(tmp_path / "agent", node.name, cluster, meters)
    try:
        busy = full_windows(agent, "gpu-busy-seconds", 2)
        joules = full_windows(agent, "gpu-joules", 2)
        for events, per_window in ((busy, Decimal("7.5")), (joules, Decimal(3000))):
            values = [(exact(e["data"]["value"]), e["data"]["complete"]) for e in events]
            assert {e["data"]["pod"] for e in events} == {"train-0"}  # this node's series only
            # 0.75 busy x 10 s; 300 W x 10 s in J (the exporter's mJ x 0.001). A window that happens
            # to straddle a late scrape (loaded CI machine) is flagged instead, never mis-billed.
            assert all(v == per_window for v, ok in values if ok), values
            assert sum(1 for _, ok in values if ok) >= 1, values
        assert not [e for e in agent.events() if e["type"] == "broken"]
        fault = healthz(agent)["sourceFaults"]["kubemeter-system/broken"]
        assert "not a series selector" in fault and "recording rule" in fault
        assert 'kubemeter_agent_source_faulted{meter="kubemeter-system/broken"} 1.0' in agent.metrics()
        assert 'kubemeter_agent_source_faulted{meter="kubemeter-system/gpu-joules"} 0.0' in agent.metrics()
    finally:
        agent.stop()
        exporter.close()


# ---- Run:ai -------------------------------------------------------------------------------------


class EmulatorThread:
    """The Run:ai emulator on its own event loop in a thread, for a test that runs an agent process."""

    def __init__(self, emulator: RunaiEmulator) -> None:
        self.emulator = emulator
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(emulator.start(), self.loop).result(timeout=10)

    def call(self, action: Callable[[], None]) -> None:
        self.loop.call_soon_threadsafe(action)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.emulator.stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def test_runai_meter_bills_gpu_allocation_with_project_and_department_and_back_fills_an_outage(
    cluster: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    node = cpu_node(cluster)
    uids = create_pods(cluster, namespace, node.name, "resnet-0")
    created = "2024-01-01T00:00:00.000Z"
    workloads = [
        {"id": "w-vision", "name": "resnet", "projectName": "vision", "departmentName": "research"},
        {"id": "w-far", "name": "far", "projectName": "ops", "departmentName": "infra"},
    ]
    pods = [
        {"id": "uid-elsewhere", "workloadId": "w-far", "nodeName": "other", "createdAt": created},
        {
            "id": uids["resnet-0"],
            "name": "resnet-0",
            "workloadId": "w-vision",
            "nodeName": node.name,
            "projectName": "vision",
            "createdAt": created,
        },
    ]
    emulator = RunaiEmulator(workloads, pods, lambda pod, metric, t: "0.5", time.time, token_ttl_s=300)
    running = EmulatorThread(emulator)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "clientId").write_text("kubemeter")
    (secret / "clientSecret").write_text("s3cret\n")
    runai_meter = meter(
        "gpu-allocation-seconds",
        "m-runai",
        namespace,
        {
            "runai": {
                "url": emulator.url,
                "metric": "GPU_ALLOCATION",
                "credentialsSecretRef": {"name": "runai"},
                "sampleStepSeconds": 1,
                "lagSeconds": 0,
            }
        },
    )
    runai_meter["credentialsDir"] = str(secret)
    agent = start_agent(tmp_path / "agent", node.name, cluster, [runai_meter])
    try:
        full_windows(agent, "gpu-allocation-seconds", 1)
        # Run:ai goes down across a window's end for 28 s: longer than the client's own retries and
        # than the two windows the agent holds other sources for. The source reports it, the agent
        # holds those windows (Run:ai keeps the metrics), and they are fetched when Run:ai is back.
        now = time.time()
        next_end = (int(now) // WINDOW_S + 1) * WINDOW_S
        time.sleep(max(0.0, next_end - 1 - now))
        running.call(lambda: setattr(emulator, "outage", True))
        fault = wait_for(
            lambda: healthz(agent)["sourceFaults"].get("kubemeter-system/gpu-allocation-seconds"),
            timeout_s=15,
            what="the Run:ai outage to show as a source fault",
        )
        assert "Run:ai unavailable" in fault
        time.sleep(max(0.0, next_end + 27 - time.time()))
        running.call(lambda: setattr(emulator, "outage", False))
        events = full_windows(agent, "gpu-allocation-seconds", 4)
        values = [(e["data"]["value"], e["data"]["complete"]) for e in events]
        assert values == [(5, True)] * 4  # 0.5 GPU x 10 s in every window, the outage's included
        data = events[0]["data"]
        assert (data["project"], data["department"], data["workload"]) == ("vision", "research", "resnet")
        assert {e["data"]["pod"] for e in events} == {"resnet-0"}
        assert emulator.requests.count("GET /api/v1/workloads/pods") > 4
        assert healthz(agent)["sourceFaults"] == {}
    finally:
        agent.stop()
        running.stop()
