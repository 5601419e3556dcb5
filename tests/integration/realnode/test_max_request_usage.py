"""basis maxRequestUsage against the real kubelet's counters on ``real-0``: per window, the larger of
the request held and the measured usage, for a pod with no requests (billed its usage) and one that
bursts past its request (billed its usage in busy windows, its request in quiet ones).

The truth is the kubelet's own ``/stats/summary``, read by the test beside the agent. The kubelet
refreshes those stats every 10-15 s (cAdvisor housekeeping) and serves the same cached sample until
the next, so a reader polling every second, as the test and the agent both do, sees every sample: the
test folds them with the documented rules (CPU: the counter's straight line from the pod's start
through the samples, cut at the window edges; memory: each sample's working set held until the next)
and compares per window."""

from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.request
from collections import defaultdict
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from kubemeter.metering.quantities import parse_quantity_milli
from kubemeter.sources.kubelet import KUBELET_SAMPLE_HOLD_MS

from testbed.controlplane import ControlPlane, wait_for
from testbed.realnode import BUSYBOX_IMAGE, NAME, RealNode, on_real_node
from tests.integration.agent.agent_harness import AgentProcess, exact, meter
from tests.integration.dra.nodes import seconds_ms
from tests.integration.dra.test_dra_metering import Pods

pytestmark = pytest.mark.integration

WINDOW_S = 10
BUSY_S = 25  # the bursty pod's first phase: 0.5 core and 48 MiB, past its 100m / 16Mi request
REQUESTS: dict[str, dict[str, str]] = {"quiet": {}, "bursty": {"cpu": "100m", "memory": "16Mi"}}
SCRIPTS = {
    # about a tenth of a core, no requests or limits at all (BestEffort)
    "quiet": "while :; do i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done; sleep 0.2; done",
    "bursty": (
        "dd if=/dev/zero of=/burst/fill bs=1M count=48 2>/dev/null; "
        f"end=$(( $(date +%s) + {BUSY_S} )); while [ $(date +%s) -lt $end ]; do :; done; "
        "rm /burst/fill; exec sleep 3600"
    ),
}


def pod_manifest(name: str) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "main",
        "image": BUSYBOX_IMAGE,
        "command": ["sh", "-c", SCRIPTS[name]],
    }
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 1,
        "containers": [container],
    }
    if REQUESTS[name]:
        container["resources"] = {"requests": REQUESTS[name], "limits": {"cpu": "500m", "memory": "128Mi"}}
        container["volumeMounts"] = [{"name": "burst", "mountPath": "/burst"}]
        spec["volumes"] = [{"name": "burst", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}}]
    return on_real_node({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})


class SummaryReader:
    """Polls the real kubelet's /stats/summary every 0.25 s and keeps each pod's distinct samples."""

    def __init__(self, real_node: RealNode, token: str, uids: dict[str, str]) -> None:
        self.url = f"{real_node.kubelet_url}/stats/summary?only_cpu_and_memory=true"
        self.context = real_node.kubelet_ssl_context()
        self.token = token
        self.uids = uids  # name -> uid
        self.samples: dict[str, list[tuple[int, int, int]]] = defaultdict(list)  # (ms, core-ns, bytes)
        self.first_seen_ms: dict[str, int] = {}  # test clock: when the newest sample was first seen
        self.started_ms: dict[str, int] = {}  # the kubelet's startTime of the pod
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(0.25):
            request = urllib.request.Request(self.url, headers={"Authorization": f"Bearer {self.token}"})
            try:
                with urllib.request.urlopen(request, context=self.context, timeout=5) as response:
                    summary = json.loads(response.read())
            except OSError as error:
                self.errors.append(str(error))
                continue
            self.fold(summary, time.time_ns() // 1_000_000)

    def fold(self, summary: dict[str, Any], seen_ms: int) -> None:
        names = {uid: name for name, uid in self.uids.items()}
        with self.lock:
            for entry in summary.get("pods") or []:
                name = names.get(entry["podRef"].get("uid"))
                cpu, memory = entry.get("cpu") or {}, entry.get("memory") or {}
                if name is None or "usageCoreNanoSeconds" not in cpu or "workingSetBytes" not in memory:
                    continue
                assert cpu["time"] == memory["time"], entry  # one cAdvisor sample for both
                sample = (
                    seconds_ms(cpu["time"]),
                    int(cpu["usageCoreNanoSeconds"]),
                    int(memory["workingSetBytes"]),
                )
                self.started_ms[name] = seconds_ms(entry["startTime"])
                series = self.samples[name]
                if not series or sample[0] > series[-1][0]:
                    series.append(sample)
                    self.first_seen_ms[name] = seen_ms

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)

    def cpu_core_ns(self, name: str, window_start_ms: int, window_end_ms: int) -> Fraction:
        """The counter's increase inside the window: linear from the pod's start (0) through the
        samples, nothing after the last."""
        series = [(self.started_ms[name], 0, 0), *self.samples[name]]
        total = Fraction(0)
        for (t0, c0, _), (t1, c1, _) in itertools.pairwise(series):
            lo, hi = max(t0, window_start_ms), min(t1, window_end_ms)
            if hi > lo:
                total += Fraction(c1 - c0) * (hi - lo) / (t1 - t0)
        return total

    def memory_byte_ms(self, name: str, window_start_ms: int, window_end_ms: int) -> int:
        """The working set held from each sample to the next (a left step), inside the window."""
        total = 0
        for (t0, _, ws), (t1, _, _) in itertools.pairwise(self.samples[name]):
            total += ws * max(0, min(t1, window_end_ms) - max(t0, window_start_ms))
        return total

    def observed(self, kind: str, name: str, window_start_ms: int, window_end_ms: int) -> bool:
        """Whether any usage data covers part of the window (CPU: from the pod's start; memory: from
        the first sample, a gauge says nothing of before it)."""
        series = self.samples[name]
        if kind == "cpu":
            series = [(self.started_ms[name], 0, 0), *series]
        return any(
            min(t1, window_end_ms) > max(t0, window_start_ms)
            for (t0, _, _), (t1, _, _) in itertools.pairwise(series)
        )


def test_max_request_usage_is_exact_against_the_real_kubelets_counters(
    cluster: ControlPlane, real_node: RealNode, namespace: str, tmp_path: Path
) -> None:
    meters = [
        meter("cpu", "m-cpu-max", namespace, {"allocation": {"resource": "cpu", "basis": "maxRequestUsage"}}),
        meter(
            "memory",
            "m-mem-max",
            namespace,
            {"allocation": {"resource": "memory", "basis": "maxRequestUsage"}},
        ),
    ]
    # The agent reaches the kubelet where real-0 says it listens, verifying it with the testbed CA.
    env = {"KUBEMETER_KUBELET_CA_FILE": str(cluster.ca.cert)}
    agent = AgentProcess(tmp_path / "agent", NAME, cluster.kubeconfig, meters, env=env)
    agent.start()
    pods = Pods(cluster, namespace)
    reader: SummaryReader | None = None
    try:
        for name in REQUESTS:
            pods.create(pod_manifest(name))
        uids = {name: cluster.get_json("pod", name, "-n", namespace)["metadata"]["uid"] for name in REQUESTS}
        reader = SummaryReader(real_node, cluster.token, uids)
        for name in REQUESTS:
            pods.running(name)
        started_ms = max(pods.start_ms.values())

        def fresh_sample_of(name: str) -> bool:
            # Delete a pod 2-5 s after its newest sample appeared: the agent, polling every second,
            # has read it too, and the kubelet's next sample (10-15 s later) comes after the pod.
            with reader.lock:
                age_ms = time.time_ns() // 1_000_000 - reader.first_seen_ms.get(name, 0)
                return reader.samples[name][-1][0] > started_ms + 45_000 and 2_000 <= age_ms <= 5_000

        remaining = set(REQUESTS)

        def delete_when_fresh() -> bool:
            for name in sorted(remaining):
                if fresh_sample_of(name):
                    pods.delete(name)
                    remaining.discard(name)
            return not remaining

        wait_for(delete_when_fresh, timeout_s=120, interval_s=0.1, what="45 s of usage, busy then quiet")
        wait_for(
            lambda: not cluster.get_json("pods", "-n", namespace)["items"],
            timeout_s=60,
            what="the pods gone from real-0",
        )
        last_ms = max(max(pods.end_ms.values()), max(s[-1][0] for s in reader.samples.values()))
        horizon_ms = (last_ms // (WINDOW_S * 1000) + 1) * WINDOW_S * 1000
        events = wait_for(
            lambda: agent.events() if min(agent.cursors_ms().values(), default=0) >= horizon_ms else None,
            timeout_s=KUBELET_SAMPLE_HOLD_MS / 1000 + 30,
            what="the agent to close the window of the last sample",
        )
    finally:
        agent.stop()
        if reader is not None:
            reader.stop()

    assert reader is not None
    steps_ms = [
        t1 - t0 for series in reader.samples.values() for (t0, *_), (t1, *_) in itertools.pairwise(series)
    ]
    print(f"kubelet sample steps (ms): {sorted(steps_ms)}; samples: {dict(reader.samples)}")
    billed = {(e["type"], e["data"]["pod"], seconds_ms(e["data"]["window_start"])): e for e in events}
    winners: dict[tuple[str, str], set[str]] = defaultdict(set)
    flagged: set[tuple[str, str]] = set()
    for (kind, name, window_ms), event in sorted(billed.items()):
        data = event["data"]
        window_end_ms = window_ms + WINDOW_S * 1000
        held_ms = max(0, min(pods.end_ms[name], window_end_ms) - max(pods.start_ms[name], window_ms))
        requested = Fraction(parse_quantity_milli(REQUESTS[name].get(kind, "0")) * held_ms, 10**6)
        if kind == "cpu":
            used = reader.cpu_core_ns(name, window_ms, window_end_ms) / 10**9
            tolerance = Fraction(2, 10**9)  # the counter's own unit, at the two window edges
        else:
            used = Fraction(reader.memory_byte_ms(name, window_ms, window_end_ms), 1000)
            tolerance = Fraction(0)
        if not reader.observed(kind, name, window_ms, window_end_ms):
            # Held, but no usage data at all (after the last sample): the request, flagged.
            assert Fraction(exact(data["value"])) == requested and not data["complete"], data
            assert "no kubelet usage" in data["incomplete_reason"], data
            flagged.add((kind, name))
            continue
        assert data["complete"], data
        expected = max(requested, used)
        assert abs(Fraction(exact(data["value"])) - expected) <= tolerance, (
            kind,
            name,
            window_ms,
            data,
            expected,
        )
        assert data["billed_on"] == ("usage" if used > requested else "request"), (kind, name, window_ms)
        winners[(kind, name)].add(data["billed_on"])
    # Every window the pods held was billed, and the kubelet's steps were its own (no missed polls
    # would flag them): the rule above held for each.
    for name in REQUESTS:
        for kind in ("cpu", "memory"):
            windows = {w for (k, n, w) in billed if (k, n) == (kind, name)}
            first = pods.start_ms[name] // (WINDOW_S * 1000) * WINDOW_S * 1000
            assert windows == set(range(first, pods.end_ms[name], WINDOW_S * 1000)), (kind, name, windows)
    # The quiet pod, with no requests, is billed its usage (its first sample, at its start, is 0);
    # the bursty one its usage in busy windows and its request in quiet ones.
    assert winners[("cpu", "quiet")] == {"usage"} and "usage" in winners[("memory", "quiet")]
    assert winners[("cpu", "bursty")] == {"request", "usage"}
    assert winners[("memory", "bursty")] == {"request", "usage"}
    assert max(steps_ms) > 2_500  # the kubelet's own resolution, longer than 2.5 agent polls
