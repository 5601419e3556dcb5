"""Subjects follow the namespace's labels from the next window on; a config reload neither skips nor
double-counts a window."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest

from testbed.controlplane import ControlPlane, wait_for
from tests.integration.agent.agent_harness import AgentProcess, exact, meter
from tests.integration.agent.test_agent_churn import seconds_ms
from tests.support.metrics_text import sample_value

pytestmark = pytest.mark.integration

WINDOW_MS = 10_000


def long_pod(cluster: ControlPlane, namespace: str, node: str) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "steady"},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "main", "image": "fake", "resources": {"requests": {"cpu": "2"}}}],
        },
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(pod))


def test_a_namespace_label_change_moves_later_windows_to_the_new_subject(
    cluster: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    node = next(n.name for n in cluster.nodes if n.capacity.get("nvidia.com/gpu") == "8")
    cluster.kubectl("label", "namespace", namespace, "customer=acme")
    cpu = meter(
        "cpu-seconds",
        "m-subject",
        namespace,
        {"allocation": {"resource": "cpu"}},
        subject={"expression": "namespace.metadata.labels['customer']"},
        dimensions={"team": "has(pod.metadata.labels.team) ? pod.metadata.labels.team : 'none'"},
    )
    agent = AgentProcess(tmp_path / "agent", node, cluster.kubeconfig, [cpu])
    agent.start()
    try:
        long_pod(cluster, namespace, node)
        wait_for(lambda: len(agent.events()) >= 2, timeout_s=40, what="two windows under the old label")
        changed_ms = time.time() * 1000
        cluster.kubectl("label", "namespace", namespace, "customer=globex", "--overwrite")
        wait_for(
            lambda: sum(e["subject"] == "globex" for e in agent.events()) >= 2,
            timeout_s=40,
            what="two windows under the new label",
        )
        events = sorted(agent.events(), key=lambda e: e["data"]["window_start"])
        subjects = [e["subject"] for e in events]
        # once moved, never back; nothing closed before the change moved
        assert subjects == sorted(subjects, key=lambda s: s == "globex"), subjects
        for event in events:
            window_end_ms = seconds_ms(event["data"]["window_end"])
            if window_end_ms + 3_000 + 2_000 < changed_ms:
                assert event["subject"] == "acme"
            if seconds_ms(event["data"]["window_start"]) > changed_ms:
                assert event["subject"] == "globex"
            assert event["data"]["team"] == "none"
    finally:
        agent.stop()


def test_a_config_reload_changes_the_subject_without_a_gap_or_a_double_count(
    cluster: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    node = next(n.name for n in cluster.nodes if n.capacity.get("nvidia.com/gpu") == "8")
    cpu = meter("cpu-seconds", "m-reload", namespace, {"allocation": {"resource": "cpu"}})
    agent = AgentProcess(tmp_path / "agent", node, cluster.kubeconfig, [cpu])
    agent.start()
    try:
        long_pod(cluster, namespace, node)
        wait_for(lambda: len(agent.events()) >= 2, timeout_s=40, what="two windows before the reload")
        reloaded = meter(
            "cpu-seconds",
            "m-reload",
            namespace,
            {"allocation": {"resource": "cpu"}},
            subject={"expression": "'reloaded-' + pod.metadata.name"},
            processors=[{"set": {"plan": "'gold'"}}],
        )
        agent.write_config([reloaded])
        wait_for(
            lambda: sum(e["subject"] == "reloaded-steady" for e in agent.events()) >= 2,
            timeout_s=40,
            what="two windows after the reload",
        )
        events = sorted(agent.events(), key=lambda e: e["data"]["window_start"])
        starts = [seconds_ms(e["data"]["window_start"]) for e in events]
        assert len(set(e["id"] for e in events)) == len(events), "a window was emitted twice"
        # contiguous windows after the first partial one, each 2 CPUs * 10 s
        assert all(b - a == WINDOW_MS for a, b in itertools.pairwise(starts)), starts
        assert all(exact(e["data"]["value"]) == 20 for e in events[1:])
        assert any(e["data"].get("plan") == "gold" for e in events)
        metrics = agent.metrics()
        assert sample_value(metrics, "kubemeter_agent_config_reloads_total", result="applied") == 1
        assert sample_value(metrics, "kubemeter_agent_config_reloads_total", result="refused") == 0
    finally:
        agent.stop()
