"""Kubelet usage: a stand-in kubelet with the upstream /stats/summary shape listens where the fake
node says its kubelet is; a counter reset is metered exactly and a gap is flagged."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from testbed.controlplane import ControlPlane, wait_for
from testbed.kubelet_endpoint import KubeletEndpoint
from tests.integration.agent.agent_harness import AgentProcess, exact, meter

pytestmark = pytest.mark.integration

CORE_NS_PER_MS = 500_000  # half a core
WORKING_SET_BYTES = 100 * 2**20
RESET_AT_MS, GAP_FROM_MS, GAP_TO_MS, GONE_AT_MS = 9_000, 14_000, 18_500, 24_000


def rfc3339_ms(moment_ms: int) -> str:
    return (
        datetime.fromtimestamp(moment_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        + f"{moment_ms % 1000:03d}Z"
    )


class StandInKubelet:
    """Serves a scripted pod: a CPU counter that resets, a steady working set, a 503/garbage gap."""

    def __init__(self, address: str, port: int, pod: dict[str, Any], certdir: Path) -> None:
        self.pod = pod
        self.t0_ms: int | None = None
        self.served: list[tuple[int, int, int]] = []  # (time ms, cpu core-ns, working set bytes)
        self.refused = 0
        self.endpoint = KubeletEndpoint(address, port, certdir, self.answer)
        self.cert = self.endpoint.cert

    def answer(self, path: str, authorization: str) -> tuple[int, str]:
        if not path.startswith("/stats/summary") or not authorization.startswith("Bearer "):
            return 403, "{}"
        now_ms = time.time_ns() // 1_000_000
        if self.t0_ms is None:
            self.t0_ms = now_ms
        elapsed_ms = now_ms - self.t0_ms
        if GAP_FROM_MS <= elapsed_ms < GAP_TO_MS:
            self.refused += 1
            return (503, "kubelet overloaded") if self.refused % 2 else (200, "{not json")
        pods = []
        if elapsed_ms < GONE_AT_MS:
            since_ms = elapsed_ms if elapsed_ms < RESET_AT_MS else elapsed_ms - RESET_AT_MS
            cpu = since_ms * CORE_NS_PER_MS
            self.served.append((now_ms, cpu, WORKING_SET_BYTES))
            meta = self.pod["metadata"]
            pods.append(
                {
                    "podRef": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
                    "startTime": rfc3339_ms(self.t0_ms),
                    "cpu": {
                        "time": rfc3339_ms(now_ms),
                        "usageNanoCores": 500_000_000,
                        "usageCoreNanoSeconds": cpu,
                    },
                    "memory": {
                        "time": rfc3339_ms(now_ms),
                        "workingSetBytes": WORKING_SET_BYTES,
                        "usageBytes": WORKING_SET_BYTES,
                    },
                    "containers": [],
                }
            )
        summary = {"node": {"nodeName": "stand-in", "startTime": rfc3339_ms(self.t0_ms)}, "pods": pods}
        return 200, json.dumps(summary)

    def expected_cpu_core_seconds(self) -> Decimal:
        total, previous = 0, None
        for _, cpu, _ in self.served:
            total += cpu if previous is None or cpu < previous else cpu - previous
            previous = cpu
        return Decimal(total).scaleb(-9)

    def expected_memory_byte_seconds(self, max_step_ms: int) -> Decimal:
        byte_ms = sum(
            ws * min(b[0] - a[0], max_step_ms)
            for a, b in zip(self.served, self.served[1:], strict=False)
            for ws in [a[2]]
        )
        return Decimal(byte_ms).scaleb(-3)

    def stop(self) -> None:
        self.endpoint.stop()


def test_kubelet_counter_reset_is_metered_exactly_and_a_gap_is_flagged(
    cluster: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    node = next(n for n in cluster.nodes if "nvidia.com/gpu" not in n.capacity)
    manifest = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "worker"},
        "spec": {"nodeName": node.name, "containers": [{"name": "main", "image": "fake"}]},
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
    pod = cluster.get_json("pod", "worker", "-n", namespace)
    kubelet = StandInKubelet(node.internal_ip, cluster.kubelet_ports[node.name], pod, tmp_path / "pki")
    meters = [
        meter("cpu-core-seconds", "m-kcpu", namespace, {"kubeletUsage": {"metric": "cpu"}}),
        meter("memory-byte-seconds", "m-kmem", namespace, {"kubeletUsage": {"metric": "memory"}}),
    ]
    agent = AgentProcess(
        tmp_path / "agent",
        node.name,
        cluster.kubeconfig,
        meters,
        env={"KUBEMETER_KUBELET_CA_FILE": str(kubelet.cert)},
    )
    agent.start()
    try:
        wait_for(
            lambda: kubelet.t0_ms is not None and time.time_ns() // 10**6 > kubelet.t0_ms + GONE_AT_MS,
            timeout_s=60,
            what="the stand-in to stop reporting the pod",
        )
        last_sample_ms = kubelet.served[-1][0]
        horizon_ms = (last_sample_ms // 10_000 + 1) * 10_000

        def closed() -> list[dict[str, Any]] | None:
            events = agent.events()
            ends = [e["data"]["window_end"] for e in events if e["type"] == "memory-byte-seconds"]
            done = any(
                datetime.fromisoformat(end.replace("Z", "+00:00")).timestamp() * 1000 >= horizon_ms
                for end in ends
            )
            return events if done else None

        events = wait_for(closed, timeout_s=30, what="the windows after the last sample to close")
        cpu = [e for e in events if e["type"] == "cpu-core-seconds"]
        memory = [e for e in events if e["type"] == "memory-byte-seconds"]
        assert sum(exact(e["data"]["value"]) for e in cpu) == kubelet.expected_cpu_core_seconds()
        assert sum(exact(e["data"]["value"]) for e in memory) == kubelet.expected_memory_byte_seconds(2_500)
        flagged = [e for e in memory if not e["data"]["complete"]]
        assert flagged and all("no kubelet sample" in e["data"]["incomplete_reason"] for e in flagged)
        assert any(not e["data"]["complete"] for e in cpu)
        assert 'kubemeter_agent_source_errors_total{source="kubelet"}' in agent.metrics()
    finally:
        agent.stop()
        kubelet.stop()
