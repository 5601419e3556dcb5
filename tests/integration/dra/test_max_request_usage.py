"""basis maxRequestUsage against a kubelet's counters: per window, the larger of the request held and
the measured usage, for a pod with no requests (billed its usage) and one that bursts past its
request (billed the request in quiet windows, its usage in busy ones).

The kubelet is the stand-in with the upstream /stats/summary shape (kwok runs no kubelet), listening
where the test's own kwok node says its kubelet is. Its CPU counter grows at a constant rate between
two answers, so the usage inside a window is the counter's straight line cut at the window's edges."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import defaultdict
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from kubemeter.metering.quantities import parse_quantity_milli

from testbed.controlplane import ControlPlane, free_port, wait_for
from tests.integration.agent.agent_harness import AgentProcess, exact, meter
from tests.integration.agent.test_agent_kubelet_usage import rfc3339_ms
from tests.integration.dra.nodes import add_node, seconds_ms
from tests.integration.dra.test_dra_metering import Pods
from tests.support.kubelet_endpoint import KubeletEndpoint

pytestmark = pytest.mark.integration

WINDOW_S = 10
NODE, NODE_IP = "kwok-usage-0", "127.0.10.41"
MAX_STEP_MS = 2_500  # 2.5 polls of 1 s: a longer step is a gap (none is expected here)
REQUESTS = {"quiet": {}, "bursty": {"cpu": "500m", "memory": "256Mi"}}
MiB = 2**20


def rates(name: str, elapsed_ms: int) -> tuple[int, int]:
    """(CPU core-ns per ms, working-set bytes) a pod shows ``elapsed_ms`` after its first sample."""
    if name == "quiet":
        return 300_000, 100 * MiB  # 0.3 core and 100 MiB, with no requests at all
    busy = (elapsed_ms // 20_000) % 2 == 1  # 20 s phases: each holds a whole window
    return (2_000_000, 512 * MiB) if busy else (200_000, 128 * MiB)  # 2 or 0.2 cores against 500m


class CountingKubelet:
    def __init__(self, port: int, certdir: Path) -> None:
        self.pods: dict[str, dict[str, Any]] = {}  # name -> pod object
        self.samples: dict[str, list[tuple[int, int, int]]] = defaultdict(list)  # (ms, core-ns, bytes)
        self.first_ms: dict[str, int] = {}
        self.started_ms: dict[str, int] = {}  # the pod's startTime, as a kubelet reports it
        self.lock = threading.Lock()
        self.endpoint = KubeletEndpoint(NODE_IP, port, certdir, self.answer)
        self.cert = self.endpoint.cert

    def answer(self, path: str, authorization: str) -> tuple[int, str]:
        if not path.startswith("/stats/summary") or not authorization.startswith("Bearer "):
            return 403, "{}"
        now_ms = time.time_ns() // 1_000_000
        entries = []
        with self.lock:
            for name, pod in self.pods.items():
                series = self.samples[name]
                first_ms = self.first_ms.setdefault(name, now_ms)
                if series:
                    last_ms, last_cpu, _ = series[-1]
                    rate, _ = rates(name, last_ms - first_ms)  # the rate chosen at the last answer
                    cpu = last_cpu + rate * (now_ms - last_ms)
                else:  # the counter has run since the pod started, at the first phase's rate
                    cpu = rates(name, 0)[0] * (now_ms - self.started_ms[name])
                _, working_set = rates(name, now_ms - first_ms)
                series.append((now_ms, cpu, working_set))
                meta = pod["metadata"]
                entries.append(
                    {
                        "podRef": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
                        "startTime": rfc3339_ms(self.started_ms[name]),
                        "cpu": {"time": rfc3339_ms(now_ms), "usageCoreNanoSeconds": cpu},
                        "memory": {"time": rfc3339_ms(now_ms), "workingSetBytes": working_set},
                        "containers": [],
                    }
                )
        return 200, json.dumps({"node": {"nodeName": NODE}, "pods": entries})

    def cpu_core_ns(self, name: str, window_start_ms: int, window_end_ms: int) -> Fraction:
        """The counter's increase inside the window: linear from the pod's start (0) through the
        answers, nothing after the last."""
        series = [(self.started_ms[name], 0, 0), *self.samples[name]]
        total = Fraction(0)
        for (t0, c0, _), (t1, c1, _) in itertools.pairwise(series):
            lo, hi = max(t0, window_start_ms), min(t1, window_end_ms)
            if hi > lo:
                total += Fraction(c1 - c0) * (hi - lo) / (t1 - t0)
        return total

    def memory_byte_ms(self, name: str, window_start_ms: int, window_end_ms: int) -> int:
        """The working set held from each answer to the next (a left step), inside the window."""
        series = self.samples[name]
        total = 0
        for (t0, _, ws), (t1, _, _) in itertools.pairwise(series):
            assert t1 - t0 <= MAX_STEP_MS, "the agent missed polls; the test assumes none"
            lo, hi = max(t0, window_start_ms), min(t1, window_end_ms)
            total += ws * max(0, hi - lo)
        return total

    def observed(self, kind: str, name: str, window_start_ms: int, window_end_ms: int) -> bool:
        """Whether any usage data covers part of the window (CPU: from the start; memory: from
        the first answer, a gauge says nothing of before it)."""
        series = self.samples[name]
        if kind == "cpu":
            series = [(self.started_ms[name], 0, 0), *series]
        return any(
            min(t1, window_end_ms) > max(t0, window_start_ms)
            for (t0, _, _), (t1, _, _) in itertools.pairwise(series)
        )

    def stop(self) -> None:
        self.endpoint.stop()


def test_max_request_usage_is_exact_against_the_kubelet_counters(
    cluster: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    port = free_port()
    add_node(cluster, NODE, {"cpu": "8", "memory": "32Gi", "pods": "110"}, {}, NODE_IP, port)
    kubelet = CountingKubelet(port, tmp_path / "pki")
    meters = [
        meter("cpu", "m-cpu-max", namespace, {"allocation": {"resource": "cpu", "basis": "maxRequestUsage"}}),
        meter(
            "memory",
            "m-mem-max",
            namespace,
            {"allocation": {"resource": "memory", "basis": "maxRequestUsage"}},
        ),
    ]
    env = {"KUBEMETER_KUBELET_CA_FILE": str(kubelet.cert)}
    agent = AgentProcess(tmp_path / "agent", NODE, cluster.kubeconfig, meters, env=env)
    agent.start()
    pods = Pods(cluster, namespace)
    try:
        for name, requests in REQUESTS.items():
            container: dict[str, Any] = {"name": "main", "image": "fake"}
            if requests:
                container["resources"] = {"requests": requests}
            manifest = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name},
                "spec": {"nodeName": NODE, "containers": [container], "terminationGracePeriodSeconds": 30},
            }
            pods.create(manifest)
            pod = cluster.get_json("pod", name, "-n", namespace)
            # Created with spec.nodeName: bound, and holding its requests, from its creation.
            pods.start_ms[name] = seconds_ms(pod["metadata"]["creationTimestamp"])
            with kubelet.lock:
                kubelet.started_ms[name] = pods.start_ms[name]
                kubelet.pods[name] = pod
        wait_for(
            lambda: (
                len(kubelet.first_ms) == 2 and time.time() * 1000 > max(kubelet.first_ms.values()) + 40_000
            ),
            timeout_s=60,
            what="40 s of usage, quiet then busy",
        )
        for name in REQUESTS:
            with kubelet.lock:
                del kubelet.pods[name]  # the kubelet reports the pod no more
            pods.delete(name)
        last_ms = max(max(pods.end_ms.values()), max(s[-1][0] for s in kubelet.samples.values()))
        horizon_ms = (last_ms // (WINDOW_S * 1000) + 1) * WINDOW_S * 1000
        events = wait_for(
            lambda: agent.events() if min(agent.cursors_ms().values(), default=0) >= horizon_ms else None,
            timeout_s=3 * WINDOW_S + 20,
            what="the agent to close the window of the last sample",
        )
    finally:
        agent.stop()
        kubelet.stop()
        cluster.kubectl("delete", "node", NODE, "--ignore-not-found")

    billed = {(e["type"], e["data"]["pod"], seconds_ms(e["data"]["window_start"])): e for e in events}
    winners: dict[tuple[str, str], set[str]] = defaultdict(set)
    flagged: set[tuple[str, str]] = set()
    for (kind, name, window_ms), event in sorted(billed.items()):
        data = event["data"]
        window_end_ms = window_ms + WINDOW_S * 1000
        start_ms, end_ms = pods.start_ms[name], pods.end_ms[name]
        held_ms = max(0, min(end_ms, window_end_ms) - max(start_ms, window_ms))
        request_milli = parse_quantity_milli(REQUESTS[name].get(kind, "0"))
        requested = Fraction(request_milli * held_ms, 10**6)  # unit-seconds
        if kind == "cpu":
            used = kubelet.cpu_core_ns(name, window_ms, window_end_ms) / 10**9
            tolerance = Fraction(2, 10**9)  # the counter's own unit, at the two window edges
        else:
            used = Fraction(kubelet.memory_byte_ms(name, window_ms, window_end_ms), 1000)
            tolerance = Fraction(0)
        if not kubelet.observed(kind, name, window_ms, window_end_ms):
            # Held, but no usage data at all (memory before the first answer): the request, flagged.
            assert Fraction(exact(data["value"])) == requested and not data["complete"], data
            assert "no kubelet usage" in data["incomplete_reason"], data
            flagged.add((kind, name))
            continue
        assert data["complete"], data
        expected = max(requested, used)
        assert abs(Fraction(exact(data["value"])) - expected) <= tolerance, (kind, name, window_ms, data)
        winners[(kind, name)].add(data["billed_on"])
    # The quiet pod, with no requests, is billed its usage; the bursty one both ways.
    assert winners[("cpu", "quiet")] == {"usage"} and winners[("memory", "quiet")] == {"usage"}
    assert winners[("cpu", "bursty")] == {"request", "usage"}
    assert winners[("memory", "bursty")] == {"request", "usage"}
    assert not {kind for kind, _ in flagged} - {"memory"}, flagged  # CPU counts from the pod's start
