"""Idle capacity on a node of the test's own, through a churn of pods, a cordon and the node's
deletion: for every (resource, window), the pods' allocation events plus the idle events equal the
node's allocatable times the time it existed in the window, and each pod's allocation equals the truth
from its own timestamps."""

from __future__ import annotations

import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from kubemeter.metering.quantities import parse_quantity_milli

from testbed.controlplane import ControlPlane, wait_for
from tests.integration.agent.agent_harness import AgentProcess, exact, meter
from tests.integration.dra.nodes import (
    DRIVER,
    add_node,
    claim_templates,
    device_classes,
    gpu,
    publish_slice,
    seconds_ms,
)
from tests.integration.dra.test_dra_metering import Pods
from tests.integration.report.test_report_sink import SinkProcess, report_json

pytestmark = pytest.mark.integration

WINDOW_S = 10
NODE = "kwok-idle-0"
CAPACITY = {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "4", "pods": "110"}
RESOURCES = ("cpu", "memory", "nvidia.com/gpu")


def plain_pod(name: str, requests: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": NODE},
            "tolerations": [{"operator": "Exists"}],
            "containers": [
                {
                    "name": "main",
                    "image": "fake",
                    "resources": {
                        "requests": requests,
                        "limits": {k: v for k, v in requests.items() if k.startswith("nvidia.com/")},
                    },
                }
            ],
            "terminationGracePeriodSeconds": 30,
        },
    }


def test_allocation_plus_idle_is_allocatable_for_every_node_and_window(
    cluster: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    node = add_node(cluster, NODE, CAPACITY, {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"})
    created_ms = seconds_ms(node["metadata"]["creationTimestamp"])
    publish_slice(cluster, NODE, [gpu("gpu-0"), gpu("gpu-1")])
    published_ms = seconds_ms(
        cluster.get_json("resourceslice", f"{NODE}-{DRIVER}")["metadata"]["creationTimestamp"]
    )
    device_classes(cluster)
    claim_templates(cluster, namespace)
    meters = []
    for resource in RESOURCES:
        meters.append(
            meter(f"alloc-{resource}", f"m-a-{resource}", namespace, {"allocation": {"resource": resource}})
        )
        meters.append(
            meter(f"idle-{resource}", f"m-i-{resource}", namespace, {"idle": {"resource": resource}})
        )
    meters.append(meter("alloc-devices", "m-a-dev", namespace, {"dra": {"driver": DRIVER}}))
    meters.append(meter("idle-devices", "m-i-dev", namespace, {"idle": {"devices": {"driver": DRIVER}}}))
    agent = AgentProcess(tmp_path / "agent", NODE, cluster.kubeconfig, meters)
    agent.start()
    pods = Pods(cluster, namespace)
    requests = {
        "a": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"},
        "b": {"cpu": "500m", "memory": "1536Mi"},
        "c": {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "2"},
        "d": {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": "1"},
    }
    try:
        for name in ("a", "b"):
            pods.create(plain_pod(name, requests[name]))
        pods.create(_with_claim(plain_pod("gpu-claim", {"cpu": "250m"})))
        for name in ("a", "b", "gpu-claim"):
            pods.running(name)
        pods.create(plain_pod("c", requests["c"]))
        pods.running("c")
        wait_for(lambda: time.time() * 1000 > pods.start_ms["c"] + 4_000, what="the pods to run a while")
        pods.delete("a")
        pods.complete("b")
        pods.create(plain_pod("d", requests["d"]))
        pods.running("d")
        wait_for(lambda: time.time() * 1000 > pods.start_ms["d"] + 6_000, what="d to run a while")
        cluster.kubectl("cordon", NODE)
        wait_for(lambda: time.time() * 1000 > pods.start_ms["d"] + 10_000, what="a cordoned while")
        for name in ("c", "d", "gpu-claim"):  # the drain
            pods.delete(name)
        wait_for(
            lambda: all(
                p["status"].get("phase") == "Succeeded"
                for p in cluster.get_json("pods", "-n", namespace)["items"]
            ),
            what="the drained pods to be gone (the finished one stays)",
        )
        before_delete_ms = time.time_ns() // 10**6
        cluster.kubectl("delete", "node", NODE)
        after_delete_ms = time.time_ns() // 10**6
        horizon_ms = (after_delete_ms // (WINDOW_S * 1000) + 1) * WINDOW_S * 1000
        events = wait_for(
            lambda: agent.events() if min(agent.cursors_ms().values(), default=0) >= horizon_ms else None,
            timeout_s=3 * WINDOW_S + 20,
            what="the agent to close the window of the node's deletion",
        )
    finally:
        agent.stop()
        cluster.kubectl("delete", "node", NODE, "--ignore-not-found")
        cluster.kubectl("delete", "resourceslice", f"{NODE}-{DRIVER}", "--ignore-not-found")

    unique = {e["id"]: e for e in events}
    allocated: dict[tuple[str, int], Decimal] = defaultdict(Decimal)
    idle: dict[tuple[str, int], Decimal] = defaultdict(Decimal)
    capacity: dict[tuple[str, int], Decimal] = defaultdict(Decimal)
    per_pod: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    states: set[str] = set()
    for event in unique.values():
        data = event["data"]
        window_ms = seconds_ms(data["window_start"])
        kind, _, resource = event["type"].partition("-")
        value = exact(data["value"])
        if kind == "alloc":
            allocated[(resource, window_ms)] += value
            per_pod[(resource, data["pod"])] += value
        else:
            assert event["subject"] == "platform-idle" and data["pod"] == "" and data["node"] == NODE
            assert data["complete"], data
            idle[(resource, window_ms)] += value
            capacity[(resource, window_ms)] += exact(data["capacity"])
            states.add(data["state"])
            if resource == "nvidia.com/gpu":
                assert data["gpu_model"] == "NVIDIA-H100-80GB-HBM3"
    assert states == {"schedulable", "cordoned"}

    # Conservation, exact, for every resource and window the node existed in.
    allocatable = {r: Decimal(parse_quantity_milli(CAPACITY[r])).scaleb(-3) for r in RESOURCES}
    allocatable["devices"] = Decimal(2)
    windows = sorted({w for (_, w) in capacity})
    # There from the API server's creationTimestamp: the Node's, or the ResourceSlice's for devices.
    there_from_ms = {**dict.fromkeys(RESOURCES, created_ms), "devices": published_ms}
    for resource in (*RESOURCES, "devices"):
        for window_ms in windows:
            key = (resource, window_ms)
            assert allocated[key] + idle[key] == capacity[key], key
            start_ms = max(window_ms, there_from_ms[resource])
            if window_ms + WINDOW_S * 1000 <= before_delete_ms:
                # The node existed all the window (from its creationTimestamp in the first one).
                present_ms = window_ms + WINDOW_S * 1000 - start_ms
                assert capacity[key] == allocatable[resource] * Decimal(present_ms).scaleb(-3), key
            else:
                # The window of the deletion: the node's end lies between the delete call and the
                # agent's next read of the node (1 s later at most, plus the read itself).
                end_ms = start_ms + int(capacity[key] / allocatable[resource] * 1000)
                assert before_delete_ms <= end_ms <= after_delete_ms + 2_000, (key, end_ms)

    # The customers' side alone, against the pods' own timestamps.
    for name, asked in requests.items():
        for resource, quantity in asked.items():
            held_ms = pods.end_ms[name] - pods.start_ms[name]
            assert per_pod[(resource, name)] == Decimal(parse_quantity_milli(quantity) * held_ms).scaleb(-6)
    claim_ms = pods.end_ms["gpu-claim"] - pods.start_ms["gpu-claim"]
    assert per_pod[("devices", "gpu-claim")] == Decimal(claim_ms).scaleb(-3)

    # The chargeback report over these events (a real sink, the real CLI): idle is its own row, the
    # customers' rows and total hold only the pods' allocation.
    (tmp_path / "sink").mkdir()
    sink = SinkProcess(tmp_path / "sink")
    try:
        sink.post(list(unique.values()))
        document = report_json(sink, "--group-by", "subject")
    finally:
        sink.stop()
    assert document["idleSubject"] == "platform-idle"
    assert [row["subject"] for row in document["rows"]] == [namespace]
    for resource in (*RESOURCES, "devices"):
        idle_sum = sum(v for (r, _), v in idle.items() if r == resource)
        allocated_sum = sum(v for (r, _), v in allocated.items() if r == resource)
        shown_idle = document["idle"]["quantities"][f"idle-{resource}"]["value"]
        shown_total = document["total"]["quantities"][f"alloc-{resource}"]["value"]
        assert shown_idle == pytest.approx(float(idle_sum), rel=1e-12), resource
        assert shown_total == pytest.approx(float(allocated_sum), rel=1e-12), resource
        assert document["total"]["quantities"][f"idle-{resource}"]["value"] == 0, resource


def _with_claim(pod: dict[str, Any]) -> dict[str, Any]:
    pod["spec"]["resourceClaims"] = [{"name": "gpu", "resourceClaimTemplateName": "one-gpu"}]
    pod["spec"]["containers"][0]["resources"]["claims"] = [{"name": "gpu"}]
    return pod
