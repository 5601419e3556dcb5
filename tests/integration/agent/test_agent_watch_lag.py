"""A pod watch that lags the API server by more than the settle time still meters every pod exactly.

The agent reaches the API server through a proxy that delivers everything 5 s late (longer than the
3 s a window waits to settle). Without a consistency barrier the agent would close windows with pods
it still believes running, and bill them past their end; and half of the pods here live 1.2-4 s, so
their whole life falls inside the lag: a barrier that only LISTed would never see them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from testbed.controlplane import ControlPlane
from tests.integration.agent.agent_harness import AgentProcess, meter
from tests.integration.agent.test_agent_churn import (
    METERS,
    WINDOW_S,
    Churn,
    check_against_truth,
    wait_until_all_windows_closed,
)
from tests.support.lagproxy import lagging
from tests.support.metrics_text import sample_value

pytestmark = pytest.mark.integration

LAG_S = 5.0


def test_pods_are_metered_exactly_when_the_pod_watch_lags_past_the_settle_time(
    cluster: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    node = next(n.name for n in cluster.nodes if n.capacity.get("nvidia.com/gpu") == "8")
    with lagging("127.0.0.1", cluster.api_port, LAG_S) as proxy:
        kubeconfig = json.loads(cluster.kubeconfig.read_text())
        kubeconfig["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
        lagging_kubeconfig = tmp_path / "lagging.kubeconfig"
        lagging_kubeconfig.write_text(json.dumps(kubeconfig))
        meters = [
            meter(t, uid, namespace, {"allocation": {"resource": r}}, windowSeconds=WINDOW_S)
            for t, (r, uid) in METERS.items()
        ]
        agent = AgentProcess(tmp_path / node, node, lagging_kubeconfig, meters)
        agent.start()
        try:
            churn = Churn(cluster, namespace, [node], seed=23)
            churn.rng = random.Random(23)
            churn.run(pods=20, spread_s=25, max_life_s=12)
            long_lived = dict(churn.truth)
            churn.run(pods=20, spread_s=25, min_life_s=1.2, max_life_s=4)  # inside the lag
            short_lived = {name: t for name, t in churn.truth.items() if name not in long_lived}
            assert all(t.end_ms is not None and t.end_ms - t.start_ms <= 5000 for t in short_lived.values())
            # Each barrier crosses the lag at least twice (its LIST, then a bookmark on a new stream).
            events = wait_until_all_windows_closed([agent], churn.truth, close_timeout_s=30 + 6 * LAG_S)
            check_against_truth(events, churn.truth)  # each pod, the short-lived ones included
            metered_pods = {e["data"]["pod"] for e in events}
            assert set(short_lived) <= metered_pods
            metrics = agent.metrics()
            assert sample_value(metrics, "kubemeter_agent_pod_list_barriers_total") >= 3
            assert sample_value(metrics, "kubemeter_agent_pods_missed_by_barrier_total") == 0
        finally:
            agent.stop()
