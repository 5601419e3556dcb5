"""The faults, one function each: inject it into the running stack, wait for the recovery a real
cluster would bring (a restarted container, a returning API), and return what was measured.

Each runs on the main thread while the churn goes on; none of them waits for the thing the verdict
checks (the sink's events): recovery conditions are only "the process answers again".
"""

from __future__ import annotations

import json
import random
import re
import signal
import sqlite3
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from chaos.verdict import WINDOW_MS
from demo.harness import NAMESPACE, wait_until

if TYPE_CHECKING:
    from chaos.run import ChaosRun

Evidence = dict[str, Any]

FILLER_SOURCE = "chaos/filler"
FILLER_TYPE = "chaos-filler"
FILLER_BATCH = 250
GATEWAY_KILL_BACKLOG = 2000
SETTLE_S = 3  # a window closes this long after its end (kubemeter.agent.meters.SETTLE_MS)


@dataclass(frozen=True)
class Fault:
    name: str  # row label and cohort of the pods started during it
    title: str
    inject: Callable[[ChaosRun], Evidence]


# ---- measurements -----------------------------------------------------------------------------------


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus text exposition's samples of ``name`` matching ``labels``."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})?\s+(\S+)$", line)
        if not match:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1) or ""))
        if all(found.get(key) == value for key, value in labels.items()):
            total += float(match.group(2))
    return total


def agent_reloads(run: ChaosRun, node: str) -> float:
    text = run.stack.get(f"{run.stack.agent_url(node)}/metrics")
    if not isinstance(text, str):
        return -1
    return metric(text, "kubemeter_agent_config_reloads_total", result="applied")


def spooled_events(run: ChaosRun, node: str) -> int:
    """Events in the agent's spool on its node (read-only; the agent keeps writing)."""
    path = run.stack.agent_dirs[node] / "spool" / "spool.db"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as connection:
            (count,) = connection.execute("SELECT COUNT(*) FROM events").fetchone()
            return int(count)
    except sqlite3.Error:
        return 0


def gateway_status(run: ChaosRun) -> dict[str, Any]:
    status = run.stack.get(f"{run.stack.gateway_url}/status")
    return status if isinstance(status, dict) else {}


def gateway_refusals(run: ChaosRun) -> float:
    text = run.stack.get(f"{run.stack.gateway_url}/metrics")
    return (
        metric(text, "kubemeter_ingest_refused_requests_total", reason="full") if isinstance(text, str) else 0
    )


def wait_drained(run: ChaosRun, timeout_s: float) -> float:
    """Until the gateway's buffer and every agent's spool are empty; returns the seconds it took."""
    started = time.monotonic()

    def drained() -> bool:
        run.check()
        if gateway_status(run).get("bufferedEvents", 1) != 0:
            return False
        return all(spooled_events(run, node) == 0 for node in run.running_agents())

    wait_until(drained, timeout_s=timeout_s, what="the gateway buffer and the agents' spools to drain")
    return time.monotonic() - started


# ---- the faults -------------------------------------------------------------------------------------


def baseline(run: ChaosRun) -> Evidence:
    return {"summary": "no fault: the control row"}


def agent_kill(run: ChaosRun) -> Evidence:
    """SIGKILL one agent (rotating over the nodes) just after it closed its windows and in the second
    after one of its pods was deleted; restart it at once as its DaemonSet would."""
    node = run.next_victim()
    agent = run.stack.agent(node)
    _sleep_until_windows_close()
    spooled = spooled_events(run, node)
    ended = run.the_churn.end_one_on(node)
    time.sleep(random.uniform(0, 0.9))  # the deletion may or may not have reached the agent
    killed_at = time.monotonic()
    agent.kill(signal.SIGKILL)
    run.stack.start_agent(node)
    wait_until(lambda: run.stack.agent_watching(node), timeout_s=90, what=f"agent {node} to watch again")
    back_s = time.monotonic() - killed_at
    just_ended = f"; pod {ended.name} deleted in the second before" if ended else ""
    return {
        "summary": (
            f"SIGKILL agent on {node} ({spooled} events in its spool{just_ended}); watching again "
            f"after {back_s:.1f} s"
        ),
        "node": node,
        "spooled_at_kill": spooled,
        "deleted_just_before": ended.name if ended else None,
        "back_after_s": round(back_s, 1),
    }


def agent_down(run: ChaosRun) -> Evidence:
    """SIGKILL one agent and keep it down while the churn deletes and creates pods on its node (a
    node under pressure, an image pull after an OOM); then start it again."""
    node = run.next_victim()
    agent = run.stack.agent(node)
    churn = run.the_churn
    ended = churn.end_one_on(node)
    deleted_before = churn.deletions_on.get(node, 0)
    killed_at = time.monotonic()
    agent.kill(signal.SIGKILL)
    run.wait(run.settings.agent_down_s)
    deleted_while_down = churn.deletions_on.get(node, 0) - deleted_before
    down_s = time.monotonic() - killed_at
    run.stack.start_agent(node)
    wait_until(lambda: run.stack.agent_watching(node), timeout_s=90, what=f"agent {node} to watch again")
    back_s = time.monotonic() - killed_at
    return {
        "summary": (
            f"SIGKILL agent on {node} (pod {ended.name if ended else '-'} deleted just before), down "
            f"{down_s:.1f} s while {deleted_while_down} of its pods were deleted; watching again after "
            f"{back_s:.1f} s"
        ),
        "node": node,
        "down_s": round(down_s, 1),
        "pods_deleted_while_down": deleted_while_down,
        "back_after_s": round(back_s, 1),
    }


def _sleep_until_windows_close() -> None:
    """Until just after the agents close their windows (3 s after a boundary): a kill then lands
    while they write events, forward them and move their cursors."""
    now_s = time.time()
    boundary_s = now_s - now_s % (WINDOW_MS / 1000)
    target_s = boundary_s + SETTLE_S + 0.3
    if target_s < now_s:
        target_s += WINDOW_MS / 1000
    time.sleep(target_s - now_s)


def _sink_stored(run: ChaosRun) -> int:
    stats = run.stack.get(f"{run.stack.sink_url}/_sink/stats") or {}
    return int(stats.get("storedEvents", 0))


def gateway_kill(run: ChaosRun) -> Evidence:
    """SIGKILL the gateway in the middle of delivering a backlog, ideally the moment the billing API
    has stored a batch the gateway has not yet acknowledged: the restarted gateway sends it again."""
    stack = run.stack
    gateway = stack.processes["gateway"]
    stack.post(f"{stack.sink_url}/_sink/faults", {"status": 503, "requests": 1_000_000})
    backlog = _fill(run, GATEWAY_KILL_BACKLOG)
    stored_before = _sink_stored(run)
    delivered_before = int(gateway_status(run).get("deliveredEvents", 0))
    stack.post(f"{stack.sink_url}/_sink/faults", {}, method="DELETE")
    buffered, caught = 0, False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stored = _sink_stored(run) - stored_before  # read first: what the API holds ...
        status = gateway_status(run)  # ... against what the gateway acknowledged after that
        buffered = int(status.get("bufferedEvents", 0))
        if stored > int(status.get("deliveredEvents", 0)) - delivered_before:
            caught = True
            break
        if not buffered:
            break
    killed_at = time.monotonic()
    gateway.kill(signal.SIGKILL)
    gateway.start()
    stack.wait_gateway_ready()
    back_s = time.monotonic() - killed_at
    drain_s = wait_drained(run, timeout_s=120)
    unacknowledged = ", with a batch stored by the API but not acknowledged" if caught else ""
    return {
        "summary": (
            f"SIGKILL gateway while delivering a backlog of {backlog} application events "
            f"({buffered} still buffered{unacknowledged}); serving again after {back_s:.1f} s, "
            f"drained {drain_s:.1f} s later"
        ),
        "application_events_acknowledged": backlog,
        "buffered_at_kill": buffered,
        "killed_with_unacknowledged_batch": caught,
        "back_after_s": round(back_s, 1),
    }


def _collector(run: ChaosRun) -> dict[str, Any]:
    path = f"/apis/kubemeter.io/v1alpha1/namespaces/{NAMESPACE}/collectors/chaos"
    collector: dict[str, Any] = run.stack.api("GET", path)
    return collector


def _patch_collector(run: ChaosRun, spec: dict[str, Any]) -> None:
    path = f"/apis/kubemeter.io/v1alpha1/namespaces/{NAMESPACE}/collectors/chaos"
    run.stack.api("PATCH", path, {"spec": spec})


def _rendered_interval(run: ChaosRun) -> int | None:
    items = run.stack.api("GET", f"/api/v1/namespaces/{NAMESPACE}/configmaps")["items"]
    for item in items:
        text = (item.get("data") or {}).get("agent.yaml")
        if text:
            match = re.search(r"^intervalSeconds:\s*(\d+)", text, re.MULTILINE)
            return int(match.group(1)) if match else None
    return None


def _wait_agents_reloaded(run: ChaosRun, before: dict[str, float], timeout_s: float) -> None:
    def reloaded() -> bool:
        run.check()
        return all(agent_reloads(run, node) > count for node, count in before.items())

    wait_until(reloaded, timeout_s=timeout_s, what="every agent to reload its configuration")


def operator_kill(run: ChaosRun) -> Evidence:
    """SIGKILL the operator, edit the Collector while it is down, start it again: it must pick the
    edit up (re-render the ConfigMap) and the agents reload it. Billing never depends on it."""
    operator = run.stack.processes["operator"]
    killed_at = time.monotonic()
    operator.kill(signal.SIGKILL)
    old = _collector(run)["spec"]["agent"]["intervalSeconds"]
    new = 2 if old != 2 else 1
    reloads = {node: agent_reloads(run, node) for node in run.running_agents()}
    _patch_collector(run, {"agent": {"intervalSeconds": new}})
    run.wait(run.settings.outage_s / 2)  # the operator stays down while traffic goes on
    operator.start()
    wait_until(lambda: _rendered_interval(run) == new, timeout_s=120, what="the operator to render the edit")
    rendered_s = time.monotonic() - killed_at
    _wait_agents_reloaded(run, reloads, timeout_s=60)
    return {
        "summary": (
            f"SIGKILL operator; Collector intervalSeconds {old}->{new} while it was down; "
            f"re-rendered {rendered_s:.1f} s after the kill and every agent reloaded it"
        ),
        "rendered_after_s": round(rendered_s, 1),
    }


def apiserver_down(run: ChaosRun) -> Evidence:
    """Stop kube-apiserver (SIGTERM), keep it down, start it again on the same port and storage.
    Nothing can change in the cluster meanwhile (the churn's calls wait); agents and the gateway must
    stay up and bill on from their caches."""
    apiserver = run.stack.apiserver()
    with run.the_churn.suspend(), run.config_sync_paused():
        stopped_at = time.monotonic()
        apiserver.stop()
        run.wait(run.settings.apiserver_down_s)
        apiserver.start()
        wait_until(run.stack.apiserver_ready, timeout_s=120, what="kube-apiserver to be ready again")
        ready_s = time.monotonic() - stopped_at

        def watching() -> bool:
            run.check()
            return all(run.stack.agent_watching(node) for node in run.running_agents())

        wait_until(watching, timeout_s=120, what="every agent's pod watch to be up again")
        watching_s = time.monotonic() - stopped_at
    pids = {node: run.stack.agent(node).pid for node in run.running_agents()}
    return {
        "summary": (
            f"kube-apiserver down {ready_s:.1f} s (stopped, restarted); every agent's pod watch up "
            f"again after {watching_s:.1f} s, no agent restarted"
        ),
        "apiserver_down_s": round(ready_s, 1),
        "agents_watching_after_s": round(watching_s, 1),
        "agent_pids": pids,
    }


def sink_outage(run: ChaosRun) -> Evidence:
    """SIGKILL the billing API, keep it down, start it again (same port, same data)."""
    sink = run.stack.processes["sink"]
    sink.kill(signal.SIGKILL)
    down_at = time.monotonic()
    peak = 0
    while time.monotonic() - down_at < run.settings.outage_s:
        run.check()
        peak = max(peak, int(gateway_status(run).get("bufferedEvents", 0)))
        time.sleep(0.5)
    sink.start()
    wait_until(lambda: run.stack.get(f"{run.stack.sink_url}/healthz"), timeout_s=60, what="the sink")
    back_at = time.monotonic()
    drain_s = wait_drained(run, timeout_s=120)
    return {
        "summary": (
            f"billing API SIGKILLed, down {back_at - down_at:.1f} s; gateway buffered up to {peak} events, "
            f"drained {drain_s:.1f} s after it came back"
        ),
        "down_s": round(back_at - down_at, 1),
        "peak_buffered": peak,
        "drained_after_s": round(drain_s, 1),
    }


def _filler_events(count: int) -> list[dict[str, Any]]:
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return [
        {
            "specversion": "1.0",
            "id": uuid.uuid4().hex,
            "source": FILLER_SOURCE,
            "type": FILLER_TYPE,
            "subject": "filler",
            "time": now,
            "datacontenttype": "application/json",
            "data": {"value": 1, "note": "x" * 400},
        }
        for _ in range(count)
    ]


def _post_to_gateway(run: ChaosRun, events: list[dict[str, Any]]) -> int:
    request = urllib.request.Request(
        f"{run.stack.gateway_url}/api/v1/events",
        data=json.dumps(events).encode(),
        method="POST",
        headers={
            "Content-Type": "application/cloudevents-batch+json",
            "Authorization": f"Bearer {run.stack.ingest_token}",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def _fill(run: ChaosRun, most: int | None = None) -> int:
    """Post application events to the gateway until ``most`` are in, or (``most`` None) until it
    refuses even a single event (503): the volume is full. Returns how many it acknowledged; those
    are owed to the billing API."""
    acknowledged = 0
    started = time.monotonic()
    for batch in (FILLER_BATCH, 25, 1) if most is None else (FILLER_BATCH,):
        while (most is None or acknowledged < most) and time.monotonic() - started < 120:
            run.check()
            events = _filler_events(batch)
            status = _post_to_gateway(run, events)
            if status == 503:
                break
            if status != 204:
                raise RuntimeError(f"the gateway answered {status} to application events")
            run.filler_ids.setdefault(run.current, set()).update(event["id"] for event in events)
            acknowledged += len(events)
    return acknowledged


def full_volume(run: ChaosRun) -> Evidence:
    """The billing API answers 503, application events fill the gateway's volume until it refuses
    even one more (503), the agents are pushed back (refused) and keep their windows in their
    spools; then the API returns and everything drains. Every application event the gateway
    acknowledged must reach the sink."""
    stack = run.stack
    stack.post(f"{stack.sink_url}/_sink/faults", {"status": 503, "requests": 1_000_000})
    started = time.monotonic()
    acknowledged = _fill(run)
    status_at_full = gateway_status(run)
    filled_s = time.monotonic() - started
    refused_at_full = gateway_refusals(run)

    # Agents are pushed back at their next window close: the gateway refuses them, they spool.
    peak_spooled: dict[str, int] = {}

    def pushed_back() -> bool:
        run.check()
        for node in run.running_agents():
            peak_spooled[node] = max(peak_spooled.get(node, 0), spooled_events(run, node))
        spooling = sum(1 for node in run.running_agents() if spooled_events(run, node))
        return gateway_refusals(run) - refused_at_full >= 2 and spooling >= 2

    wait_until(pushed_back, timeout_s=60, what="the gateway to refuse the agents and them to spool")
    run.wait(run.settings.outage_s / 2)  # stay full a while; refused agents retry meanwhile
    for node in run.running_agents():
        peak_spooled[node] = max(peak_spooled.get(node, 0), spooled_events(run, node))
    refusals = gateway_refusals(run) - refused_at_full
    stack.post(f"{stack.sink_url}/_sink/faults", {}, method="DELETE")
    drain_s = wait_drained(run, timeout_s=180)
    volume = run.gateway_volume
    return {
        "summary": (
            f"{volume} filled by {acknowledged} application events in {filled_s:.1f} s "
            f"({status_at_full.get('bufferedBytes', '?')} bytes buffered); then the gateway refused "
            f"the agents {refusals:.0f} times; {sum(1 for c in peak_spooled.values() if c)} agents spooled "
            f"up to {max(peak_spooled.values(), default=0)} events; all drained {drain_s:.1f} s after "
            "the API returned"
        ),
        "volume": volume,
        "application_events_acknowledged": acknowledged,
        "buffered_bytes_when_full": status_at_full.get("bufferedBytes"),
        "gateway_refusals": refusals,
        "agents_spooled": peak_spooled,
        "drained_after_s": round(drain_s, 1),
    }


def collector_edit(run: ChaosRun) -> Evidence:
    """During traffic: change the sampling interval and add a Meter (MIG slices). Pods asking for MIG
    slices start only once every agent runs the new meter (a new meter starts with the window it was
    first loaded in, so earlier MIG usage is by design not billed)."""
    old = _collector(run)["spec"]["agent"]["intervalSeconds"]
    new = 1 if old != 1 else 3
    reloads = {node: agent_reloads(run, node) for node in run.running_agents()}
    edited_at = time.monotonic()
    _patch_collector(run, {"agent": {"intervalSeconds": new}})
    run.stack.apply([run.added_meter])
    wait_until(
        lambda: _rendered_interval(run) == new and "mig-seconds" in run.stack.agent_config_text,
        timeout_s=120,
        what="the operator to render the edited Collector and the new Meter",
    )
    rendered_s = time.monotonic() - edited_at
    _wait_agents_reloaded(run, reloads, timeout_s=60)
    reloaded_s = time.monotonic() - edited_at
    run.the_churn.allow_mig = True
    return {
        "summary": (
            f"Collector intervalSeconds {old}->{new} and Meter mig-seconds added during traffic; "
            f"rendered after {rendered_s:.1f} s, every agent reloaded after {reloaded_s:.1f} s"
        ),
        "rendered_after_s": round(rendered_s, 1),
        "agents_reloaded_after_s": round(reloaded_s, 1),
    }


def rollout_restart(run: ChaosRun) -> Evidence:
    """A config roll-out with agents restarting in the middle of it: the Collector is edited; one
    agent is stopped (SIGTERM, as a rolling update does) and started again on the old file before the
    new ConfigMap reaches the nodes; once it does, another is SIGKILLed (an OOM) as it reloads. Pods
    of both are deleted in the second before each restart."""
    churn, stack = run.the_churn, run.stack
    old = _collector(run)["spec"]["agent"]["intervalSeconds"]
    new = 2 if old != 2 else 3
    first, second = run.next_victim(), run.next_victim()
    started_at = time.monotonic()
    with run.config_sync_paused():
        _patch_collector(run, {"agent": {"intervalSeconds": new}})
        wait_until(lambda: _rendered_interval(run) == new, timeout_s=120, what="the operator to render it")
        ended_first = churn.end_one_on(first)
        stack.agent(first).stop(timeout_s=30)
        stack.start_agent(first)
        wait_until(lambda: stack.agent_watching(first), timeout_s=90, what=f"agent {first} to watch again")
        reloads = {node: agent_reloads(run, node) for node in run.running_agents() if node != second}
    wait_until(
        lambda: f"intervalSeconds: {new}" in (stack.agent_dirs[second] / "agent.yaml").read_text(),
        timeout_s=30,
        what="the new config on the nodes",
    )
    ended_second = churn.end_one_on(second)
    stack.agent(second).kill(signal.SIGKILL)
    stack.start_agent(second)
    wait_until(lambda: stack.agent_watching(second), timeout_s=90, what=f"agent {second} to watch again")
    _wait_agents_reloaded(run, reloads, timeout_s=60)
    done_s = time.monotonic() - started_at
    return {
        "summary": (
            f"Collector intervalSeconds {old}->{new}; agent on {first} restarted (SIGTERM) before the "
            f"new config reached it (pod {ended_first.name if ended_first else '-'} deleted just "
            f"before), agent on {second} SIGKILLed as it arrived (pod "
            f"{ended_second.name if ended_second else '-'} deleted just before); roll-out done, "
            f"every other agent reloaded, after {done_s:.1f} s"
        ),
        "restarted": [first, second],
        "rollout_s": round(done_s, 1),
    }


def node_delete(run: ChaosRun) -> Evidence:
    """Delete a Node: its pods end, then its agent is stopped (SIGTERM, as its pod would be)."""
    node = run.node_to_delete
    deleted_at = time.monotonic()
    run.stack.api("DELETE", f"/api/v1/nodes/{node}")
    ending = run.the_churn.retire(node)
    wait_until(
        lambda: all(pod.deleted for pod in ending), timeout_s=60, what=f"the pods on {node} to be deleted"
    )
    agent = run.stack.agent(node)
    process = agent.component.process
    run.retired_agents.add(node)
    agent.stop(timeout_s=60)
    stopped_s = time.monotonic() - deleted_at
    code = None if process is None else process.returncode
    return {
        "summary": (
            f"Node {node} deleted; its {len(ending)} pods ended; its agent stopped (SIGTERM) "
            f"{stopped_s:.1f} s later, exit code {code}"
        ),
        "node": node,
        "pods_ended": len(ending),
        "agent_stopped_after_s": round(stopped_s, 1),
    }


FAULTS: tuple[Fault, ...] = (
    Fault("baseline", "none (control)", baseline),
    Fault("agent-kill", "agent SIGKILL", agent_kill),
    Fault("agent-down", "agent down while pods end", agent_down),
    Fault("gateway-kill", "gateway SIGKILL", gateway_kill),
    Fault("operator-kill", "operator SIGKILL", operator_kill),
    Fault("apiserver-down", "API server down", apiserver_down),
    Fault("sink-outage", "billing API outage", sink_outage),
    Fault("full-volume", "full PV", full_volume),
    Fault("collector-edit", "Collector edited", collector_edit),
    Fault("rollout-restart", "agents restarted in a roll-out", rollout_restart),
    Fault("node-delete", "node deleted", node_delete),
)
