"""``make chaos``: the end-to-end fault suite.

With the whole stack running (:mod:`demo.harness`) and pods churning (:mod:`chaos.churn`), it injects
each fault of :data:`chaos.faults.FAULTS` in turn, ends every pod, waits for the last windows to
reach the sink, and judges (:mod:`chaos.verdict`) the sink's events against the ground truth taken
from the pods' own timestamps: per fault (the pods started during it), events lost, billed twice,
wrong, flagged, and the largest per-pod error. Prints the table and writes it as JSON.

    python -m chaos.run            # the full form: 45 s per fault, 3 agent kills (about 14 minutes)
    python -m chaos.run --short    # each fault once, short: what CI runs (tests/e2e/test_chaos.py)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from kubemeter.api.rendered import GatewayConfig

from chaos.churn import Churn
from chaos.faults import (
    FAULTS,
    FILLER_SOURCE,
    SETTLE_S,
    Evidence,
    Fault,
    gateway_status,
    spooled_events,
)
from chaos.verdict import WINDOW_MS, judge, judge_filler, stored_usage_events
from demo.harness import NAMESPACE, Stack, wait_until
from testbed.controlplane import REPO_ROOT

MANIFESTS = Path(__file__).with_name("manifests.yaml")
CUSTOMERS = {"chaos-acme": "acme", "chaos-globex": "globex"}
VOLUME_BYTES = 4 * 2**20  # the gateway's PV when a tmpfs can be mounted; else buffer.size caps it


@dataclass(frozen=True)
class Settings:
    phase_s: float  # churn time per fault, injection and recovery included
    lead_s: float  # churn before the fault is injected
    outage_s: float  # how long the billing API (and the operator, half of it) stays down
    live_target: int  # pods of the current cohort alive at once
    lifetime_s: tuple[float, float]
    agent_down_s: float  # how long one agent stays down while its pods end
    apiserver_down_s: float
    agent_kills: int = 1


SHORT = Settings(
    phase_s=14, lead_s=4, outage_s=6, live_target=6, lifetime_s=(3, 11), agent_down_s=10, apiserver_down_s=8
)
FULL = Settings(
    phase_s=45,
    lead_s=10,
    outage_s=20,
    live_target=10,
    lifetime_s=(3, 40),
    agent_down_s=90,
    apiserver_down_s=120,
    agent_kills=3,
)

# Pods that live through every fault; the one on kwok-gpu-1 ends when that node is deleted.
LONG_LIVED = (
    ("kwok-gpu-0", {"nvidia.com/gpu": "4", "cpu": "32", "memory": "256Gi"}),
    ("kwok-gpu-1", {"nvidia.com/gpu": "2", "cpu": "16", "memory": "64Gi"}),
    ("kwok-cpu-0", {"cpu": "8", "memory": "32Gi"}),
)


@dataclass
class Phase:
    fault: Fault
    started_at: str
    wall_s: float = 0.0
    evidence: Evidence = field(default_factory=dict)
    redeliveries_absorbed: int = 0  # the sink's duplicateEvents counter over the phase


@dataclass
class ChaosRun:
    stack: Stack
    settings: Settings
    out: Path
    churn: Churn | None = None
    phases: list[Phase] = field(default_factory=list)
    # Application events the gateway acknowledged, per fault (the gateway-kill backlog, the filler).
    filler_ids: dict[str, set[str]] = field(default_factory=dict)
    current: str = "setup"
    retired_agents: set[str] = field(default_factory=set)
    gateway_volume: str = ""
    node_to_delete: str = "kwok-gpu-1"
    mount_volume: bool = True  # a tmpfs for the gateway's queue when this process may mount one
    added_meter: dict[str, Any] = field(default_factory=dict)
    _victims: list[str] = field(default_factory=list)
    _mounted: Path | None = None
    _sync_stop: threading.Event = field(default_factory=threading.Event)
    _sync_paused: threading.Event = field(default_factory=threading.Event)
    _sync_errors: list[str] = field(default_factory=list)

    # ---- helpers for the faults ------------------------------------------------------------------
    def check(self) -> None:
        self.stack.check_processes()

    def wait(self, seconds: float) -> None:
        """Let traffic run for ``seconds`` (a duration of the scenario, not a wait for a condition)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.check()
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))

    def running_agents(self) -> list[str]:
        return [node for node in self.stack.nodes if node not in self.retired_agents]

    def next_victim(self) -> str:
        if not self._victims:
            self._victims = [n for n in self.stack.nodes if n != self.node_to_delete]
        return self._victims.pop(0)

    @property
    def the_churn(self) -> Churn:
        assert self.churn is not None
        return self.churn

    @contextlib.contextmanager
    def config_sync_paused(self) -> Iterator[None]:
        self._sync_paused.set()
        try:
            yield
        finally:
            self._sync_paused.clear()

    # ---- set-up ----------------------------------------------------------------------------------
    def set_up(self) -> None:
        stack = self.stack
        stack.start_cluster()
        self.gateway_volume = self._gateway_volume()
        stack.start_sink()
        stack.say(f"billing API (kubemeter sink) on {stack.sink_url}")
        stack.kubectl("create", "namespace", NAMESPACE)
        for namespace, customer in CUSTOMERS.items():
            stack.api(
                "POST",
                "/api/v1/namespaces",
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": namespace, "labels": {"billing.kubemeter.io/customer": customer}},
                },
            )
        documents = list(yaml.safe_load_all(MANIFESTS.read_text()))
        self.added_meter = next(d for d in documents if d["metadata"]["name"] == "mig-seconds")
        stack.apply(d for d in documents if d is not self.added_meter)
        stack.start_operator()
        config_map = stack.wait_rendered_config()
        stack.start_gateway(GatewayConfig.from_yaml(config_map["data"]["gateway.yaml"]))
        stack.say(f"gateway on {stack.gateway_url}, its queue on {self.gateway_volume}")
        stack.start_agents(config_map["data"]["agent.yaml"])
        wait_until(
            lambda: all(stack.agent_watching(node) for node in stack.nodes),
            timeout_s=120,
            what="every agent to watch its pods",
        )
        stack.say(f"{len(stack.nodes)} agents watching; operator, gateway and sink running")
        threading.Thread(target=self._sync_configs, name="configmap-sync", daemon=True).start()
        self.churn = Churn(
            api=stack.api,
            customers=CUSTOMERS,
            live_target=self.settings.live_target,
            lifetime_s=self.settings.lifetime_s,
        )
        for node, requests in LONG_LIVED:
            self.churn.add_long_lived(node, requests)
        self.churn.start()

    def _gateway_volume(self) -> str:
        """A real small filesystem for the gateway's queue when this process may mount one."""
        path = self.stack.state / "gateway-volume"
        path.mkdir(parents=True, exist_ok=True)
        self.stack.gateway_data_dir = path
        if self.mount_volume and os.geteuid() == 0 and shutil.which("mount"):
            mounted = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={VOLUME_BYTES}", "tmpfs", str(path)],
                capture_output=True,
                check=False,
            )
            if mounted.returncode == 0:
                self._mounted = path
                return f"a {VOLUME_BYTES // 2**20} MiB tmpfs"
        return "the state directory, capped by buffer.size (no tmpfs mounted)"

    def _sync_configs(self) -> None:
        while not self._sync_stop.wait(1.0):
            if self._sync_paused.is_set():
                continue
            try:
                if self.stack.sync_agent_configs():
                    self.stack.say("ConfigMap changed: agents' config files rewritten (the kubelet's part)")
            except (OSError, ValueError, KeyError) as error:
                self._sync_errors.append(f"{type(error).__name__}: {error}")

    # ---- the run ---------------------------------------------------------------------------------
    def run_faults(self, faults: Sequence[Fault]) -> None:
        churn = self.the_churn
        for fault in faults:
            for repeat in range(self.settings.agent_kills if fault.name == "agent-kill" else 1):
                self._run_phase(churn, fault, repeat)

    def _run_phase(self, churn: Churn, fault: Fault, repeat: int) -> None:
        stack = self.stack
        churn.begin(fault.name)
        self.current = fault.name
        phase = Phase(fault, datetime.now(UTC).isoformat(timespec="seconds"))
        duplicates_before = self._sink_duplicates()
        started = time.monotonic()
        stack.say(f"--- {fault.title}{f' #{repeat + 1}' if repeat else ''}: churning")
        self.wait(self.settings.lead_s)
        evidence = fault.inject(self)
        stack.say(f"    {evidence['summary']}")
        self.wait(max(2.0, self.settings.phase_s - (time.monotonic() - started)))
        phase.wall_s = round(time.monotonic() - started, 1)
        phase.evidence = evidence
        phase.redeliveries_absorbed = self._sink_duplicates() - duplicates_before
        if repeat and self.phases and self.phases[-1].fault is fault:
            previous = self.phases[-1]
            previous.evidence = {**previous.evidence, f"repeat {repeat + 1}": evidence}
            previous.evidence["summary"] += f"; {evidence['summary']}"
            previous.wall_s += phase.wall_s
            previous.redeliveries_absorbed += phase.redeliveries_absorbed
        else:
            self.phases.append(phase)

    def _sink_duplicates(self) -> int:
        stats = self.stack.get(f"{self.stack.sink_url}/_sink/stats") or {}
        return int(stats.get("duplicateEvents", 0))

    def finish(self, timeout_s: float = 90) -> dict[str, Any]:
        """End every pod, wait for the last windows to reach the sink, and judge."""
        churn, stack = self.the_churn, self.stack
        churn.end_all()
        wait_until(lambda: not churn.live(), timeout_s=90, what="every pod to be deleted")
        last_release_ms = max(p.released_ms or 0 for p in churn.pods)
        closes_at = (last_release_ms // WINDOW_MS + 1) * WINDOW_MS / 1000 + SETTLE_S
        stack.say(f"every pod ended; the last window closes in {closes_at - time.time():.0f} s")
        deadline = closes_at + timeout_s
        stable_since, last_count = time.monotonic(), -1
        while True:
            self.check()
            verdict = self.judge()
            if verdict["exact"]:
                stack.say("the sink holds exactly the ground truth")
                return verdict
            count = verdict["sink"]["storedEvents"]
            if count != last_count:
                stable_since, last_count = time.monotonic(), count
            settled = time.time() > closes_at + 2 and time.monotonic() - stable_since > 8
            if (settled and self._drained()) or time.time() > deadline:
                stack.say("the sink stopped changing and differs from the ground truth")
                return verdict
            time.sleep(2)

    def _drained(self) -> bool:
        if gateway_status(self).get("bufferedEvents", 1) != 0:
            return False
        return all(spooled_events(self, node) == 0 for node in self.running_agents())

    def judge(self) -> dict[str, Any]:
        stack = self.stack
        body = stack.get(f"{stack.sink_url}/api/v1/usage/events?limit=1000000") or {}
        events = body.get("events", [])
        stats = stack.get(f"{stack.sink_url}/_sink/stats") or {}
        stored = stored_usage_events(events)
        lives = self.the_churn.lives()
        rows: list[dict[str, Any]] = []
        known = {(p.namespace, p.name) for p in lives}
        cohorts = [phase.fault.name for phase in self.phases] + ["long-lived"]
        for phase_or_none in [*self.phases, None]:
            cohort = "long-lived" if phase_or_none is None else phase_or_none.fault.name
            outcome = judge(cohort, [p for p in lives if p.cohort == cohort], stored)
            row = {
                "fault": "long-lived pods (every fault)"
                if phase_or_none is None
                else phase_or_none.fault.title,
                **outcome.to_json(),
            }
            if phase_or_none is not None:
                row["wall_s"] = phase_or_none.wall_s
                row["redeliveries_absorbed"] = phase_or_none.redeliveries_absorbed
                row["evidence"] = phase_or_none.evidence
            rows.append(row)
        strays = [e for e in stored if (e.key[0], e.key[1]) not in known]
        setup = judge("setup", [p for p in lives if p.cohort not in cohorts], stored)
        filler_stored = [e["eventId"] for e in events if e["source"] == FILLER_SOURCE]
        acknowledged = set().union(*self.filler_ids.values()) if self.filler_ids else set()
        filler_strays = judge_filler(acknowledged, filler_stored).unexpected
        for row in rows:
            if row["cohort"] in self.filler_ids:
                filler = judge_filler(self.filler_ids[row["cohort"]], filler_stored)
                row["application_events"] = {
                    "acknowledged": filler.acknowledged,
                    "lost": filler.lost,
                    "exact": filler.lost == 0,
                }
                row["lost"] += filler.lost
                row["exact"] = row["exact"] and filler.lost == 0
        exact = (
            all(row["exact"] for row in rows)
            and setup.exact
            and not strays
            and not filler_strays
            and stats.get("storedEvents") == stats.get("distinctEventIds")
            and not stats.get("specViolations")
        )
        return {
            "exact": exact,
            "rows": rows,
            "setup_pods": setup.to_json(),
            "stray_events": len(strays) + filler_strays,
            "sink": {
                key: stats.get(key)
                for key in ("storedEvents", "distinctEventIds", "duplicateEvents", "specViolations")
            },
            "churn": self.the_churn.summary(),
        }

    # ---- tear-down -------------------------------------------------------------------------------
    def tear_down(self) -> list[int]:
        self._sync_stop.set()
        if self.churn is not None:
            self.churn.stop()
        self.stack.stop()
        if self._mounted is not None:
            subprocess.run(["umount", str(self._mounted)], capture_output=True, check=False)
        return self.stack.leftover_pids()


# ---- the table -------------------------------------------------------------------------------------


def render(result: dict[str, Any]) -> str:
    header = (
        f"{'fault':<30} {'pods':>5} {'events':>7} {'lost':>5} {'twice':>6} {'wrong':>6} "
        f"{'flagged':>8} {'redeliv.':>9} {'max pod err s':>14}  outcome"
    )
    lines = [header, "-" * len(header)]
    for row in result["rows"]:
        wrong = row["wrong_value"] + row["unexpected"] + row["wrong_subject"]
        lines.append(
            f"{row['fault']:<30} {row['pods']:>5} {row['expected_events']:>7} {row['lost']:>5} "
            f"{row['billed_twice']:>6} {wrong:>6} {row['flagged_incomplete']:>8} "
            f"{row.get('redeliveries_absorbed', '-')!s:>9} {Decimal(row['max_pod_error_s']):>14.3f}  "
            f"{'exact' if row['exact'] else 'NOT EXACT'}"
        )
    lines.append("-" * len(header))
    sink = result["sink"]
    lines.append(
        f"sink: {sink['storedEvents']} events stored, {sink['distinctEventIds']} distinct ids, "
        f"{sink['duplicateEvents']} redeliveries deduplicated, {sink['specViolations']} spec violations; "
        f"{result['stray_events']} events of unknown pods"
    )
    lines.append("")
    for row in result["rows"]:
        if "evidence" in row:
            lines.append(f"{row['fault']}: {row['evidence']['summary']}")
    for row in result["rows"]:
        for text in row["examples"]:
            lines.append(f"  {row['fault']}: {text}")
        for error in row["pod_errors"][:5]:
            lines.append(
                f"  {row['fault']}: {error['pod']} on {error['node']} {error['meter']}: expected "
                f"{error['expected']}, billed {error['billed']} ({error['error_s']} s); "
                f"windows {error['windows']}"
            )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="each fault once, short durations (CI)")
    parser.add_argument(
        "--faults", default="", help=f"comma-separated subset of: {', '.join(f.name for f in FAULTS)}"
    )
    parser.add_argument(
        "--no-mount",
        action="store_true",
        help="fill the gateway's byte cap, not a tmpfs, in the full-PV fault",
    )
    parser.add_argument("--state", type=Path, default=REPO_ROOT / ".state" / "chaos")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "chaos" / "results")
    args = parser.parse_args(argv)
    chosen = [f for f in FAULTS if not args.faults or f.name in args.faults.split(",")]
    settings = SHORT if args.short else FULL
    started = time.monotonic()
    run = ChaosRun(Stack(args.state.resolve()), settings, args.out.resolve(), mount_volume=not args.no_mount)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    result: dict[str, Any] = {}
    try:
        run.set_up()
        setup_s = time.monotonic() - started
        run.run_faults(chosen)
        result = run.finish()
        result["setup_s"] = round(setup_s, 1)
    except KeyboardInterrupt:
        run.stack.say("interrupted; tearing down")
        return 130
    finally:
        leftovers = run.tear_down()
        run.stack.say(f"stopped every process; state left in {run.stack.state}")
    result.update(
        form="short" if args.short else "full",
        settings=settings.__dict__,
        wall_s=round(time.monotonic() - started, 1),
        leftover_processes=leftovers,
        machine=machine(),
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        gateway_volume=run.gateway_volume,
    )
    print()
    print(render(result))
    print(f"\nwall time {result['wall_s']:.0f} s (set-up {result.get('setup_s', 0):.0f} s)")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "latest.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"results: {path}")
    if leftovers:
        print(f"processes left running: {leftovers}", file=sys.stderr)
        return 1
    return 0 if result.get("exact") else 1


if __name__ == "__main__":
    raise SystemExit(main())
