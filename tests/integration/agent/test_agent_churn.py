"""Churn on three GPU nodes: metered totals per pod equal the truth from the pods' own timestamps,
also when agents are SIGKILLed at random moments."""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from kubemeter.metering.ids import event_id
from kubemeter.metering.quantities import parse_quantity_milli
from kubernetes import client, config

from testbed.controlplane import ControlPlane, wait_for
from tests.integration.agent.agent_harness import AgentProcess, exact, meter
from tests.support.metrics_text import sample_value

pytestmark = pytest.mark.integration

WINDOW_S = 10
METERS = {
    # event type -> (resource, uid)
    "gpu-seconds": ("nvidia.com/gpu", "m-gpu"),
    "mig-seconds": ("nvidia.com/mig-1g.10gb", "m-mig"),
    "cpu-seconds": ("cpu", "m-cpu"),
    "memory-byte-seconds": ("memory", "m-mem"),
}


def seconds_ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


@dataclass
class Truth:
    """What the test itself knows of a pod: its requests and the timestamps the API server returned."""

    name: str
    uid: str
    node: str
    requests_milli: dict[str, int]
    start_ms: int
    end_ms: int | None = None
    how: str = ""  # "delete" or "complete"; shown when a total differs
    answer: str = ""  # the API server's answer to the finishing call, for the same reason


def pod_manifest(name: str, node: str, rng: random.Random) -> tuple[dict[str, Any], dict[str, int]]:
    gpus = rng.choice([0, 1, 2, 4])
    mig = rng.choice([0, 0, 1, 2])
    cpu = rng.choice(["250m", "1", "2", "3500m"])
    memory = rng.choice(["256Mi", "1Gi", "1536Mi"])
    app = {"cpu": cpu, "memory": memory}
    if gpus:
        app["nvidia.com/gpu"] = str(gpus)
    if mig:
        app["nvidia.com/mig-1g.10gb"] = str(mig)
    containers = [
        {
            "name": "main",
            "image": "fake",
            "resources": {
                "requests": app,
                "limits": {k: v for k, v in app.items() if k.startswith("nvidia.com/")},
            },
        }
    ]
    init: list[dict[str, Any]] = []
    requests = {k: parse_quantity_milli(v) for k, v in app.items()}
    if rng.random() < 0.3:
        # an init container bigger than the app: the effective CPU request is the init one
        init = [{"name": "fetch", "image": "fake", "resources": {"requests": {"cpu": "6"}}}]
        requests["cpu"] = max(requests["cpu"], 6000)
    spec: dict[str, Any] = {
        "nodeName": node,
        "containers": containers,
        "tolerations": [{"operator": "Exists"}],
        "terminationGracePeriodSeconds": 30,
    }
    if init:
        spec["initContainers"] = init
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}, requests


class Churn:
    def __init__(self, cluster: ControlPlane, namespace: str, nodes: list[str], seed: int) -> None:
        api_client = config.new_client_from_config(str(cluster.kubeconfig))  # type: ignore[no-untyped-call]
        self.core: Any = client.CoreV1Api(api_client)  # the typed client models every field as optional
        self.namespace = namespace
        self.nodes = nodes
        self.rng = random.Random(seed)
        self.truth: dict[str, Truth] = {}
        self.lock = threading.Lock()
        # Pods ended (or being ended): each exactly once, by the plan or by end_one_on.
        self.ending: set[str] = set()

    def create(self, index: int) -> Truth:
        node = self.nodes[index % len(self.nodes)]
        manifest, requests = pod_manifest(f"p-{index:03d}", node, self.rng)
        pod = self.core.create_namespaced_pod(self.namespace, manifest)
        truth = Truth(
            pod.metadata.name,
            pod.metadata.uid,
            node,
            requests,
            int(pod.metadata.creation_timestamp.timestamp() * 1000),
        )
        with self.lock:
            self.truth[truth.name] = truth
        return truth

    def live_on(self, node: str) -> int:
        """Pods on ``node`` created and not yet ended (nor being ended)."""
        with self.lock:
            return sum(1 for t in self.truth.values() if t.node == node and t.name not in self.ending)

    def end_one_on(self, node: str) -> Truth | None:
        """End one live pod on ``node`` now (a deletion or a completion): the last moment before a kill."""
        with self.lock:
            live = [t for t in self.truth.values() if t.node == node and t.name not in self.ending]
            if not live:
                return None
            truth = self.rng.choice(live)
            self.ending.add(truth.name)
        self.finish(truth, self.rng.choice(["delete", "complete"]), claimed=True)
        return truth

    def finish(self, truth: Truth, how: str, claimed: bool = False) -> None:
        if not claimed:
            with self.lock:
                if truth.name in self.ending:
                    return  # ended already (end_one_on)
                self.ending.add(truth.name)
        truth.how = how
        if how == "delete":
            pod = self.core.delete_namespaced_pod(truth.name, self.namespace)
            deletion_ms = int(pod.metadata.deletion_timestamp.timestamp() * 1000)
            truth.end_ms = deletion_ms - 1000 * pod.metadata.deletion_grace_period_seconds
            truth.answer = (
                f"{pod.metadata.deletion_timestamp} grace {pod.metadata.deletion_grace_period_seconds}"
            )
        else:  # the containers exit, as a kubelet would report it
            now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
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
                            "state": {
                                "terminated": {
                                    "exitCode": 0,
                                    "reason": "Completed",
                                    "startedAt": now,
                                    "finishedAt": now,
                                }
                            },
                        }
                    ],
                }
            }
            pod = self.core.patch_namespaced_pod_status(truth.name, self.namespace, status)
            finished = pod.status.container_statuses[0].state.terminated.finished_at
            truth.end_ms = int(finished.timestamp() * 1000)
            truth.answer = f"phase {pod.status.phase} finished {finished} status {pod.status.to_dict()}"

    def run(self, pods: int, spread_s: float, max_life_s: float, min_life_s: float = 3) -> None:
        """Create ``pods`` pods over ``spread_s`` seconds; each lives ``min_life_s`` to ``max_life_s``
        (at least 1.1 s, so that whole-second API timestamps still show it lived)."""
        started = time.monotonic()
        plan = []
        first = len(self.truth)  # a second run goes on numbering
        for index in range(first, first + pods):
            birth = self.rng.uniform(0, spread_s)
            life = self.rng.uniform(min_life_s, max_life_s)
            plan.append((birth, index, "create"))
            plan.append((birth + life, index, self.rng.choice(["delete", "complete"])))
        plan.sort()
        by_index: dict[int, Truth] = {}
        with ThreadPoolExecutor(4) as pool:
            for moment, index, action in plan:
                delay = moment - (time.monotonic() - started)
                if delay > 0:
                    time.sleep(delay)
                if action == "create":
                    by_index[index] = self.create(index)
                else:
                    pool.submit(self.finish, by_index[index], action).result()


def expected_by_meter(truth: dict[str, Truth]) -> dict[tuple[str, str], Decimal]:
    expected: dict[tuple[str, str], Decimal] = {}
    for pod in truth.values():
        assert pod.end_ms is not None
        for event_type, (resource, _) in METERS.items():
            milli = pod.requests_milli.get(resource, 0)
            if milli:
                expected[(event_type, pod.name)] = Decimal(milli * (pod.end_ms - pod.start_ms)).scaleb(-6)
    return expected


def metered(events: list[dict[str, Any]]) -> tuple[dict[tuple[str, str], Decimal], dict[str, Decimal]]:
    totals: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    by_id: dict[str, Decimal] = {}
    for event in events:
        value = exact(event["data"]["value"])
        if event["id"] in by_id:
            assert by_id[event["id"]] == value, f"id {event['id']} emitted twice with different values"
            continue
        by_id[event["id"]] = value
        totals[(event["type"], event["data"]["pod"])] += value
    return dict(totals), by_id


def start_agents(
    tmp_path: Path, cluster: ControlPlane, namespace: str, nodes: list[str]
) -> list[AgentProcess]:
    meters = [
        meter(t, uid, namespace, {"allocation": {"resource": r}}, windowSeconds=WINDOW_S)
        for t, (r, uid) in METERS.items()
    ]
    agents = [AgentProcess(tmp_path / node, node, cluster.kubeconfig, meters) for node in nodes]
    for agent in agents:
        agent.start()
    return agents


def wait_until_all_windows_closed(
    agents: list[AgentProcess], truth: dict[str, Truth], close_timeout_s: float = 30
) -> list[dict[str, Any]]:
    last_end_ms = max(t.end_ms or 0 for t in truth.values())
    horizon_ms = (last_end_ms // (WINDOW_S * 1000) + 1) * WINDOW_S * 1000
    wait_for(lambda: time.time() * 1000 > horizon_ms + 4_000, timeout_s=WINDOW_S + 10, what="last window end")

    def closed() -> list[dict[str, Any]] | None:
        # Every meter of every agent has moved its checkpointed cursor past the last pod's end.
        if any(min(agent.cursors_ms().values(), default=0) < horizon_ms for agent in agents):
            return None
        return [e for agent in agents for e in agent.events()]

    return list(wait_for(closed, timeout_s=close_timeout_s, what="agents to close the last window"))


def check_against_truth(events: list[dict[str, Any]], truth: dict[str, Truth]) -> dict[str, Decimal]:
    totals, by_id = metered(events)
    expected = expected_by_meter(truth)
    # A pod whose API timestamps give it no time at all (ended in the second it started: the killer
    # may end one just created) held nothing, and nothing billed is its exact bill.
    mismatches = {
        key: (totals.get(key), value)
        for key, value in expected.items()
        if totals.get(key, Decimal(0) if value == 0 else None) != value
    }
    extra = set(totals) - set(expected)
    by_name = {t.name: t for t in truth.values()}
    assert not mismatches, (
        f"{len(mismatches)} pod totals differ (metered, truth): {list(mismatches.items())[:5]}; "
        f"truth of the first: {by_name[next(iter(mismatches))[1]]}"
    )
    assert not extra, f"metered pods the truth does not know: {sorted(extra)[:5]}"
    assert all(e["data"]["complete"] for e in events), [e for e in events if not e["data"]["complete"]][:2]
    # every id is the deterministic id of its (meter, pod, window)
    uids = {t.name: t.uid for t in truth.values()}
    meter_uids = {t: uid for t, (_, uid) in METERS.items()}
    for event in events:
        window_start_ms = seconds_ms(event["data"]["window_start"])
        assert event["id"] == event_id(
            "test", meter_uids[event["type"]], uids[event["data"]["pod"]], window_start_ms
        )
    return by_id


def test_churn_of_200_pods_is_metered_exactly_per_pod(
    cluster: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    nodes = [n.name for n in cluster.nodes if n.capacity.get("nvidia.com/gpu") == "8"][:3]
    agents = start_agents(tmp_path, cluster, namespace, nodes)
    try:
        churn = Churn(cluster, namespace, nodes, seed=7)
        churn.run(pods=210, spread_s=20, max_life_s=25)
        events = wait_until_all_windows_closed(agents, churn.truth)
        by_id = check_against_truth(events, churn.truth)
        assert len(churn.truth) == 210 and len(by_id) > 400
        for agent in agents:
            metrics = agent.metrics()
            written = sum(1 for e in agent.events())
            assert sample_value(metrics, "kubemeter_agent_events_emitted_total") == written
            assert sample_value(metrics, "kubemeter_agent_windows_closed_total") >= 4 * 3
            assert sample_value(metrics, "kubemeter_agent_pods_missed_by_barrier_total") == 0
            assert sample_value(metrics, "kubemeter_agent_pods_vanished_total") == 0
    finally:
        for agent in agents:
            agent.stop()


def test_agents_killed_at_random_moments_emit_identical_ids_and_totals(
    cluster: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    """Each kill lands within a second of one of the node's pods ending, and more of its pods end
    while it is down: the restarted agent resumes its watch and gets their final states."""
    nodes = [n.name for n in cluster.nodes if n.capacity.get("nvidia.com/gpu") == "8"][:3]
    agents = start_agents(tmp_path, cluster, namespace, nodes)
    rng = random.Random(11)
    kills: list[str] = []
    ended_at_kill: list[str] = []
    churn = Churn(cluster, namespace, nodes, seed=13)
    stop = threading.Event()

    errors: list[BaseException] = []

    def killer() -> None:
        try:
            kill_five_times()
        except BaseException as error:
            errors.append(error)

    def kill_five_times() -> None:
        for _ in range(5):
            if stop.wait(rng.uniform(1, 3)):
                return
            # An agent with a pod to end (the churn's own ledger), so that each kill follows a deletion.
            agent = rng.choice([a for a in agents if churn.live_on(a.node)] or agents)
            ended = churn.end_one_on(agent.node)
            time.sleep(rng.uniform(0, 0.9))  # the kill lands in the second after that pod ended
            agent.kill()
            kills.append(agent.node)
            if ended is not None:
                ended_at_kill.append(ended.name)
            time.sleep(rng.uniform(2, 5))  # down: the churn ends more of its pods meanwhile
            agent.start()

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        churn.run(pods=200, spread_s=30, max_life_s=25)
        thread.join()
        assert not errors, errors
        assert len(kills) == 5 and len(ended_at_kill) >= 4, (kills, ended_at_kill)
        events = wait_until_all_windows_closed(agents, churn.truth)
        check_against_truth(events, churn.truth)
        for agent in agents:
            if agent.node in kills:
                metrics = agent.metrics()  # the last process's own counts
                assert sample_value(metrics, "kubemeter_agent_pod_watch_resumes_total") >= 1
                assert sample_value(metrics, "kubemeter_agent_pod_relists_total") == 0
                assert sample_value(metrics, "kubemeter_agent_pods_vanished_total") == 0
    finally:
        stop.set()
        thread.join()
        for agent in agents:
            agent.stop()


# How long the agent stays down while its pods end; within the API server's watch-cache history
# (docs/metering.md, "How long an agent may be away": here the cache holds every event of the
# outage), so their final states are still there to resume from.
AGENT_DOWN_S = 90


def test_pods_that_end_while_their_agent_is_down_90_s_are_metered_exactly(
    cluster: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    node = next(n.name for n in cluster.nodes if n.capacity.get("nvidia.com/gpu") == "8")
    (agent,) = start_agents(tmp_path, cluster, namespace, [node])
    try:
        churn = Churn(cluster, namespace, [node], seed=29)
        pods = [churn.create(index) for index in range(12)]
        wait_for(
            lambda: len(agent.pods_held_as_running()) == len(pods),
            timeout_s=20,
            what="the agent to checkpoint every pod",
        )
        agent.kill()
        down_at = time.monotonic()
        # Every pod ends while the agent is down, spread over the outage (a deletion or the
        # containers exiting), and more pods come and go entirely inside it.
        for index, truth in enumerate(pods):
            time.sleep(max(0.0, down_at + 4 + index * 6 - time.monotonic()))
            churn.finish(truth, "delete" if index % 2 else "complete")
            if index % 3 == 0:
                brief = churn.create(100 + index)
                time.sleep(1.5)
                churn.finish(brief, "delete")
        time.sleep(max(0.0, down_at + AGENT_DOWN_S - time.monotonic()))
        down_s = time.monotonic() - down_at
        agent.start()
        events = wait_until_all_windows_closed([agent], churn.truth)
        check_against_truth(events, churn.truth)  # per pod, per resource, and complete=true
        metrics = agent.metrics()
        print(f"agent down {down_s:.1f} s; {len(churn.truth)} pods ended meanwhile; {len(events)} events")
        assert down_s >= AGENT_DOWN_S
        assert sample_value(metrics, "kubemeter_agent_pod_watch_resumes_total") >= 1
        assert sample_value(metrics, "kubemeter_agent_pod_relists_total") == 0
        assert sample_value(metrics, "kubemeter_agent_pods_vanished_total") == 0
    finally:
        agent.stop()
