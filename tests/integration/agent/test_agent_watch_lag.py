"""A pod watch that lags the API server by more than the settle time still meters every pod exactly.

The agent reaches the API server through a proxy that delivers everything 5 s late (longer than the
3 s a window waits to settle). Without a consistency barrier the agent would close windows with pods
it still believes running, and bill them past their end.
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
            churn.run(pods=40, spread_s=25, max_life_s=12)
            events = wait_until_all_windows_closed([agent], churn.truth)
            check_against_truth(events, churn.truth)
            metrics = agent.metrics()
            assert "kubemeter_agent_pod_list_barriers_total" in metrics, metrics[:2000]
        finally:
            agent.stop()
