"""Past the watch cache's history a final state is unknowable, and the agent says so.

An agent resumes its pod watch from its checkpointed resourceVersion; the API server can replay what
happened since only while that version is in its watch cache. A kube-apiserver restart rebuilds the
cache from etcd as of that moment (docs/metering.md, "How long an agent may be away": measured, a
version from before the restart answers 410 Gone), which is the same as an absence longer than the
cache's history. Pods deleted while the agent was away are then gone without a final state: they are
billed no further than the agent knew them, and their last window is flagged ``complete: false``;
the pods that lived through it are still exact.
"""

from __future__ import annotations

import time
from decimal import Decimal
from pathlib import Path

import pytest
from kubernetes.client.exceptions import ApiException

from testbed.controlplane import ControlPlane, wait_for
from tests.integration.agent.test_agent_churn import (
    METERS,
    Churn,
    check_against_truth,
    expected_by_meter,
    metered,
    start_agents,
    wait_until_all_windows_closed,
)
from tests.support.metrics_text import sample_value

pytestmark = pytest.mark.integration


def restart_apiserver(cluster: ControlPlane) -> None:
    apiserver = next(c for c in cluster.components if c.name == "kube-apiserver")
    apiserver.stop()
    apiserver.start()
    wait_for(
        lambda: cluster.kubectl("get", "--raw", "/readyz", check=False).returncode == 0,
        timeout_s=120,
        what="kube-apiserver ready again",
    )


def gone_from_the_api(churn: Churn, name: str) -> bool:
    try:
        churn.core.read_namespaced_pod(name, churn.namespace)
    except ApiException as error:
        if error.status == 404:
            return True
        raise
    return False


def test_pods_that_end_past_the_watch_cache_history_are_billed_no_further_and_flagged(
    cluster: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    node = next(n.name for n in cluster.nodes if n.capacity.get("nvidia.com/gpu") == "8")
    (agent,) = start_agents(tmp_path, cluster, namespace, [node])
    try:
        churn = Churn(cluster, namespace, [node], seed=31)
        pods = [churn.create(index) for index in range(6)]
        wait_for(
            lambda: len(agent.pods_held_as_running()) == len(pods),
            timeout_s=20,
            what="the agent to checkpoint every pod",
        )
        time.sleep(5)  # its heartbeat (saved every second) now says it watched until about here
        agent.kill()
        killed_ms = time.time_ns() // 1_000_000
        gone, survivors = pods[:3], pods[3:]
        for truth in gone:
            churn.finish(truth, "delete")
        # Gone from the API server (kwok removes them once deleted): only their DELETED events, which
        # the restart drops with the cache, held their final state. A pod still Terminating at the
        # restart would keep it in the list, and be billed exactly.
        wait_for(
            lambda: all(gone_from_the_api(churn, truth.name) for truth in gone),
            timeout_s=30,
            what="the deleted pods to be removed",
        )
        restart_apiserver(cluster)
        agent.start()
        time.sleep(3)
        for truth in survivors:
            churn.finish(truth, "delete")
        events = wait_until_all_windows_closed([agent], churn.truth)

        metrics = agent.metrics()
        assert sample_value(metrics, "kubemeter_agent_pod_relists_total") == 1  # the 410, then a LIST
        assert sample_value(metrics, "kubemeter_agent_pods_vanished_total") == len(gone)

        gone_names = {t.name for t in gone}
        check_against_truth(
            [e for e in events if e["data"]["pod"] not in gone_names], {t.name: t for t in survivors}
        )
        totals, _ = metered([e for e in events if e["data"]["pod"] in gone_names])
        expected = expected_by_meter({t.name: t for t in gone})
        for truth in gone:
            flagged = [e for e in events if e["data"]["pod"] == truth.name and not e["data"]["complete"]]
            assert flagged, f"{truth.name} ended unseen but no window of it is flagged"
            assert all("vanished" in e["data"]["incomplete_reason"] for e in flagged), flagged[:1]
            for event_type, (resource, _) in METERS.items():
                milli = truth.requests_milli.get(resource, 0)
                if not milli:
                    continue
                billed = totals[(event_type, truth.name)]
                # Never past its real end, never past the moment the agent was killed. Short of that
                # by no more than the heartbeat's second and its margin, the whole second it is
                # floored to (as the API server's timestamps are), its save, and the whole second the
                # creationTimestamp drops.
                assert billed <= expected[(event_type, truth.name)]
                known_ms = killed_ms - truth.start_ms
                assert Decimal(milli * known_ms).scaleb(-6) >= billed, (event_type, truth.name)
                assert billed >= Decimal(milli * (known_ms - 4_000)).scaleb(-6), (event_type, truth.name)
    finally:
        agent.stop()
