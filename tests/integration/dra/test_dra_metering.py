"""DRA on the real scheduler: pods whose GPUs come from ResourceClaims (templates, MIG devices, a
claim shared by two pods) are allocated devices from the ResourceSlice published for a kwok node, reach
Running, and are billed exactly their device-seconds, per pod and device, against the pods' own
timestamps from the API server."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from testbed.controlplane import ControlPlane, wait_for
from tests.integration.agent.agent_harness import AgentProcess, exact, meter
from tests.integration.dra.nodes import (
    A100,
    DRIVER,
    add_node,
    claim_templates,
    device_classes,
    gpu,
    mig,
    pod_with_claim,
    publish_slice,
    shared_claim,
)

pytestmark = pytest.mark.integration

WINDOW_S = 10
NODE = "kwok-dra-0"


class Pods:
    """Creates, finishes and remembers pods, with the API server's timestamps as the truth."""

    def __init__(self, cluster: ControlPlane, namespace: str) -> None:
        api_client = config.new_client_from_config(str(cluster.kubeconfig))  # type: ignore[no-untyped-call]
        self.core: Any = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.start_ms: dict[str, int] = {}
        self.end_ms: dict[str, int] = {}

    def create(self, manifest: dict[str, Any]) -> None:
        self.core.create_namespaced_pod(self.namespace, manifest)

    def running(self, name: str) -> None:
        def scheduled_and_running() -> int | None:
            pod = self.core.read_namespaced_pod(name, self.namespace)
            if pod.status.phase != "Running":
                return None
            condition = next(c for c in pod.status.conditions if c.type == "PodScheduled")
            return int(condition.last_transition_time.timestamp() * 1000)

        self.start_ms[name] = wait_for(scheduled_and_running, timeout_s=30, what=f"pod {name} Running")

    def delete(self, name: str) -> None:
        pod = self.core.delete_namespaced_pod(name, self.namespace)
        deletion_ms = int(pod.metadata.deletion_timestamp.timestamp() * 1000)
        self.end_ms[name] = deletion_ms - 1000 * pod.metadata.deletion_grace_period_seconds

    def complete(self, name: str) -> None:
        """The container exits, as a kubelet would report it: a short job."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        terminated = {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}
        status = {
            "status": {
                "phase": "Succeeded",
                "containerStatuses": [
                    {
                        "name": "main",
                        "image": "fake",
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": terminated},
                    }
                ],
            }
        }
        pod = self.core.patch_namespaced_pod_status(name, self.namespace, status)
        self.end_ms[name] = int(
            pod.status.container_statuses[0].state.terminated.finished_at.timestamp() * 1000
        )


def allocated_devices(cluster: ControlPlane, namespace: str) -> dict[str, list[str]]:
    """Claim name -> devices the scheduler allocated, as the API server has them."""
    claims = cluster.get_json("resourceclaims.resource.k8s.io", "-n", namespace)["items"]
    return {
        c["metadata"]["name"]: [r["device"] for r in c["status"]["allocation"]["devices"]["results"]]
        for c in claims
        if (c.get("status") or {}).get("allocation")
    }


@pytest.fixture
def dra_node(cluster: ControlPlane) -> Iterator[str]:
    """The DRA node and its ResourceSlice, removed after the test: later tests count the nodes."""
    add_node(cluster, NODE, {"cpu": "64", "memory": "512Gi", "pods": "110"}, {"example.com/pool": "dra"})
    try:
        yield NODE
    finally:
        cluster.kubectl("delete", "resourceslice", f"{NODE}-{DRIVER}", "--ignore-not-found")
        cluster.kubectl("delete", "node", NODE, "--ignore-not-found")


def test_dra_devices_allocated_by_the_scheduler_are_billed_exactly_per_pod(
    cluster: ControlPlane, namespace: str, dra_node: str, tmp_path: Path
) -> None:
    device_classes(cluster)
    mig_devices = ["gpu-3-mig-19-0-1", "gpu-3-mig-19-1-1"]
    publish_slice(cluster, NODE, [gpu("gpu-0"), gpu("gpu-1"), gpu("gpu-2"), *(mig(d) for d in mig_devices)])
    claim_templates(cluster, namespace)
    shared_claim(cluster, namespace, "team-gpu")
    meters = [
        meter("dra-gpu-seconds", "m-dra", namespace, {"dra": {"driver": DRIVER}}, windowSeconds=WINDOW_S),
        meter(
            "mig-seconds",
            "m-dra-mig",
            namespace,
            {"dra": {"selector": f"device.attributes['{DRIVER}'].type == 'mig'", "perDevice": False}},
            windowSeconds=WINDOW_S,
        ),
    ]
    agent = AgentProcess(tmp_path / "agent", NODE, cluster.kubeconfig, meters)
    agent.start()
    pods = Pods(cluster, namespace)
    try:
        for name, claim in (
            ("train", {"resourceClaimTemplateName": "one-gpu"}),
            ("short-job", {"resourceClaimTemplateName": "one-gpu"}),
            ("mig-a", {"resourceClaimTemplateName": "one-mig"}),
            ("shared-a", {"resourceClaimName": "team-gpu"}),
        ):
            pods.create(pod_with_claim(name, NODE, claim))
        for name in ("train", "short-job", "mig-a", "shared-a"):
            pods.running(name)
        devices = allocated_devices(cluster, namespace)  # the scheduler's allocations, from the API
        assert devices["team-gpu"][0] in {"gpu-0", "gpu-1", "gpu-2"}
        # three claims from templates and the shared one, each with its own device
        assert len({d for ds in devices.values() for d in ds}) == 4, devices
        wait_for(lambda: time.time() * 1000 > pods.start_ms["short-job"] + 2_000, what="a two-second job")
        pods.complete("short-job")
        pods.create(pod_with_claim("shared-b", NODE, {"resourceClaimName": "team-gpu"}))
        pods.running("shared-b")
        # shared-b joins the claim shared-a holds: one claim, reserved for both.
        shared = cluster.get_json("resourceclaim.resource.k8s.io", "team-gpu", "-n", namespace)
        assert {r["name"] for r in shared["status"]["reservedFor"]} == {"shared-a", "shared-b"}
        wait_for(
            lambda: time.time() * 1000 > pods.start_ms["shared-b"] + 6_000, what="the pods to run a while"
        )
        pods.delete("mig-a")
        pods.delete("shared-a")
        wait_for(lambda: time.time() * 1000 > pods.end_ms["shared-a"] + 5_000, what="shared-b alone a while")
        pods.delete("shared-b")
        pods.delete("train")

        last_end_ms = max(pods.end_ms.values())
        horizon_ms = (last_end_ms // (WINDOW_S * 1000) + 1) * WINDOW_S * 1000
        events = wait_for(
            lambda: agent.events() if min(agent.cursors_ms().values(), default=0) >= horizon_ms else None,
            timeout_s=3 * WINDOW_S + 20,
            what="the agent to close the window of the last pod's end",
        )
    finally:
        agent.stop()

    def held_s(name: str) -> Decimal:
        return Decimal(pods.end_ms[name] - pods.start_ms[name]).scaleb(-3)

    # The shared claim: each pod alone gets the whole GPU, together half each.
    overlap_ms = max(
        0,
        min(pods.end_ms["shared-a"], pods.end_ms["shared-b"])
        - max(pods.start_ms["shared-a"], pods.start_ms["shared-b"]),
    )
    expected = {
        "train": held_s("train"),
        "short-job": held_s("short-job"),
        "mig-a": held_s("mig-a"),
        "shared-a": held_s("shared-a") - Decimal(overlap_ms).scaleb(-3) / 2,
        "shared-b": held_s("shared-b") - Decimal(overlap_ms).scaleb(-3) / 2,
    }
    assert overlap_ms > 4_000
    totals: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    seen: dict[str, Decimal] = {}
    for event in events:
        value = exact(event["data"]["value"])
        assert seen.setdefault(event["id"], value) == value, "one id, two values"
        if seen[event["id"]] is value:
            totals[(event["type"], event["data"]["pod"])] += value
        assert event["data"]["complete"], event
    gpu_seconds = {pod: v for (kind, pod), v in totals.items() if kind == "dra-gpu-seconds"}
    assert gpu_seconds == expected
    assert {pod: v for (kind, pod), v in totals.items() if kind == "mig-seconds"} == {
        "mig-a": expected["mig-a"]
    }
    assert Decimal(0) < expected["short-job"] <= Decimal(6)

    by_pod = {e["data"]["pod"]: e["data"] for e in events if e["type"] == "dra-gpu-seconds"}
    assert by_pod["mig-a"]["mig_profile"] == "1g.10gb" and by_pod["mig-a"]["device"] in mig_devices
    assert by_pod["train"]["gpu_model"] == A100 and by_pod["train"]["driver"] == DRIVER
    assert by_pod["shared-a"]["device"] == by_pod["shared-b"]["device"] == devices["team-gpu"][0]
    assert by_pod["shared-a"]["claim"] == "team-gpu"
    assert len({by_pod[p]["device"] for p in ("train", "short-job", "mig-a", "shared-a")}) == 4
