"""``make demo``: kubemeter end to end on this machine, then a chargeback table.

It brings up the local control plane (etcd, kube-apiserver, controllers, kwok nodes), installs the
CRDs, runs the operator, a gateway, one agent per fake node and ``kubemeter sink`` as local processes,
applies ``examples/gpu-chargeback.yaml`` (its output pointed at the local sink), starts GPU, CPU and
memory workloads for three teams, lets them run, ends them, waits for every window to reach the sink
and prints the chargeback table next to the ground truth computed from the pods' own timestamps.

The stack itself (control plane, sink, operator, gateway, agents as local processes) is
:mod:`demo.harness`, shared with ``make chaos``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml
from kubemeter.api.rendered import AgentConfig, GatewayConfig
from kubemeter.report.pricing import Pricing, load_pricing

from demo.harness import NAMESPACE, Stack
from testbed.controlplane import REPO_ROOT, wait_for

EXAMPLE = REPO_ROOT / "examples" / "gpu-chargeback.yaml"
GRACE_S = 30  # the default terminationGracePeriodSeconds: deletionTimestamp = request + grace

# The terminal table and the HTML report are priced by the same file.
PRICING_FILE = REPO_ROOT / "examples" / "report" / "pricing.yaml"

TEAMS = {"team-a": "acme", "team-b": "globex", "team-c": "initech"}


@dataclass(frozen=True)
class Workload:
    namespace: str
    name: str
    requests: dict[str, str]
    node_selector: dict[str, str]
    run_s: int | None  # None: runs until the demo ends it


def workloads() -> list[Workload]:
    h100 = {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    h200 = {"nvidia.com/gpu.product": "NVIDIA-H200"}
    cpu = {"kubernetes.io/hostname": "kwok-cpu-0"}
    return [
        Workload(
            "team-a", "train-llm-0", {"nvidia.com/gpu": "8", "cpu": "64", "memory": "512Gi"}, h100, None
        ),
        Workload(
            "team-a", "train-llm-1", {"nvidia.com/gpu": "8", "cpu": "64", "memory": "512Gi"}, h100, None
        ),
        Workload("team-a", "eval-short", {"nvidia.com/gpu": "1", "cpu": "4", "memory": "16Gi"}, h200, 7),
        Workload("team-b", "infer-0", {"nvidia.com/gpu": "1", "cpu": "8", "memory": "64Gi"}, h200, None),
        Workload("team-b", "infer-1", {"nvidia.com/gpu": "1", "cpu": "8", "memory": "64Gi"}, h200, None),
        Workload("team-b", "batch-short", {"nvidia.com/gpu": "2", "cpu": "2", "memory": "8Gi"}, h200, 20),
        Workload("team-b", "api", {"cpu": "4", "memory": "8Gi"}, cpu, None),
        Workload("team-c", "etl", {"cpu": "12", "memory": "48Gi"}, cpu, None),
        Workload("team-c", "notebook", {"cpu": "2", "memory": "16Gi"}, cpu, 45),
    ]


@dataclass
class Demo(Stack):
    out: Path = Path("demo-out")
    run_s: int = 90
    held: dict[str, dict[str, Any]] = field(default_factory=dict)  # pod -> bound/released/requests

    def apply_example(self) -> None:
        self.kubectl("create", "namespace", NAMESPACE)
        self.apply(yaml.safe_load_all(EXAMPLE.read_text()))
        self.say(f"applied {EXAMPLE.relative_to(REPO_ROOT)} in namespace {NAMESPACE}")

    def start_data_plane(self) -> None:
        self.start_operator()
        config_map = self.wait_rendered_config()
        self.say("operator reconciled the Collector: RBAC, ConfigMap, agent DaemonSet, gateway StatefulSet")
        self.start_gateway(GatewayConfig.from_yaml(config_map["data"]["gateway.yaml"]))
        self.say(f"gateway up on {self.gateway_url}, delivering to the sink")
        self.start_agents(config_map["data"]["agent.yaml"])
        meters = ", ".join(m.name for m in AgentConfig.from_yaml(self.agent_config_text).meters)
        self.say(f"{len(self.nodes)} agents metering {meters}")

    def start_workloads(self) -> list[Workload]:
        for namespace, customer in TEAMS.items():
            self.kubectl("create", "namespace", namespace)
            self.kubectl("label", "namespace", namespace, f"billing.kubemeter.io/customer={customer}")
        chosen = workloads()
        for workload in chosen:
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": workload.name,
                    "namespace": workload.namespace,
                    "labels": {"team": workload.namespace},
                },
                "spec": {
                    "nodeSelector": workload.node_selector,
                    "containers": [
                        {
                            "name": "main",
                            "image": "registry.local/workload:1",
                            "resources": {"requests": workload.requests, "limits": workload.requests},
                        }
                    ],
                },
            }
            self.kubectl("apply", "-f", "-", input=json.dumps(pod))
        self.say(f"started {len(chosen)} workloads for {', '.join(f'{n} ({c})' for n, c in TEAMS.items())}")
        return chosen

    def end_pod(self, workload: Workload) -> None:
        """Delete through the API and keep what it returns: the deletion request time is the release."""
        assert self.plane is not None
        path = f"/api/v1/namespaces/{workload.namespace}/pods/{workload.name}"
        running = json.loads(self.kubectl("get", "--raw", path))
        deleted = json.loads(self.kubectl("delete", "--raw", path))
        bound = next(
            c["lastTransitionTime"] for c in running["status"]["conditions"] if c["type"] == "PodScheduled"
        )
        deletion = _parse(deleted["metadata"]["deletionTimestamp"])
        grace_s = int(deleted["metadata"].get("deletionGracePeriodSeconds", GRACE_S))
        self.held[f"{workload.namespace}/{workload.name}"] = {
            "namespace": workload.namespace,
            "node": running["spec"]["nodeName"],
            "bound": _parse(bound),
            "released": deletion - grace_s,
            "requests": workload.requests,
        }

    def run_workloads(self, chosen: list[Workload]) -> None:
        wait_for(lambda: self._all_running(chosen), timeout_s=90, what="every workload to be Running")
        started = time.monotonic()
        pending = sorted((w for w in chosen if w.run_s is not None), key=lambda w: w.run_s or 0)
        while time.monotonic() - started < self.run_s:
            self.check_processes()
            elapsed = time.monotonic() - started
            for workload in [w for w in pending if (w.run_s or 0) <= elapsed]:
                self.end_pod(workload)
                pending.remove(workload)
                self.say(f"short job {workload.namespace}/{workload.name} ended after {workload.run_s} s")
            self.progress(f"running {int(elapsed)}/{self.run_s} s")
            time.sleep(5)
        for workload in pending + [w for w in chosen if w.run_s is None]:
            self.end_pod(workload)
        self.say("workloads ended; waiting for the last windows to close and reach the sink")

    def _all_running(self, chosen: list[Workload]) -> bool:
        self.check_processes()
        for namespace in TEAMS:
            pods = json.loads(self.kubectl("get", "pods", "-n", namespace, "-o", "json"))["items"]
            if sum(1 for p in pods if p["status"].get("phase") == "Running") < sum(
                1 for w in chosen if w.namespace == namespace
            ):
                return False
        return True

    def wait_for_delivery(self, timeout_s: float = 180) -> None:
        """Every meter's last window closes at the next boundary after the last release; then the
        agents' interval and the gateway's batch delay pass. Waits until the sink's totals equal the
        ground truth, or until ``timeout_s`` after the close (the table then shows what differs)."""
        assert self.plane is not None
        window_s = 60
        last_release = max(h["released"] for h in self.held.values())
        closes_at = (int(last_release) // window_s + 1) * window_s
        truth = self.truth()
        while time.time() < closes_at + timeout_s:
            self.check_processes()
            rows = chargeback_rows(self.metered(), load_pricing(PRICING_FILE))
            metered = {f"{r['subject']}|{r['meter']}|{r['gpu_model']}": r["value"] for r in rows}
            if metered == truth:
                self.say("every window reached the sink")
                return
            waiting = (
                f"final windows close in {int(closes_at - time.time())} s"
                if time.time() < closes_at
                else (
                    f"{sum(1 for k in truth if metered.get(k) != truth[k])} of {len(truth)} totals "
                    "still arriving"
                )
            )
            self.progress(waiting)
            time.sleep(5)
        self.say(f"gave up waiting {timeout_s:.0f} s after the last window closed")

    def truth(self) -> dict[str, Decimal]:
        assert self.plane is not None
        models = {n.name: n.labels.get("nvidia.com/gpu.product", "") for n in self.plane.nodes}
        return ground_truth(self.held, models)

    # ---- report ----------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        truth = self.truth()
        metered = self.metered()
        rows = chargeback_rows(metered, load_pricing(PRICING_FILE))
        print()
        print(render_table(rows, truth))
        self.out.mkdir(parents=True, exist_ok=True)
        summary = {"rows": rows, "ground_truth": truth, "sink": self.sink_url}
        (self.out / "chargeback.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        stored = self.get(f"{self.sink_url}/api/v1/usage/events") or {}
        (self.out / "sink-events.json").write_text(json.dumps(stored.get("events", []), indent=2) + "\n")
        self.run_report("--format", "html", "--output", str(self.out / "report.html"))
        self.say(f"HTML report (open it in a browser): {self.out / 'report.html'}")
        for customer in sorted({row["subject"] for row in rows}):
            for kind in ("html", "csv"):
                path = self.out / f"statement-{customer}.{kind}"
                self.run_report("--customer", customer, "--format", kind, "--output", str(path))
        self.say(f"a statement per customer: {self.out / 'statement-acme.html'} (and .csv), ...")
        self.say(f"table as JSON: {self.out / 'chargeback.json'}")
        return summary

    def run_report(self, *args: str) -> None:
        """``kubemeter report`` on the sink, priced by the same file as the terminal table."""
        argv = [sys.executable, "-m", "kubemeter_cli", "report", "--url", self.sink_url]
        argv += ["--pricing", str(PRICING_FILE), *args]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise SystemExit(f"kubemeter report {' '.join(args)} failed:\n{result.stderr[-3000:]}")

    def metered(self) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode(
            [("groupBy", "subject"), ("groupBy", "type"), ("groupBy", "gpu_model")], doseq=True
        )
        body = self.get(f"{self.sink_url}/api/v1/usage?{query}")
        assert body is not None, "the sink did not answer the usage query"
        rows: list[dict[str, Any]] = body["data"] if isinstance(body, dict) else body
        return rows


def _parse(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _quantity(text: str) -> Decimal:
    units = {
        "Ki": Decimal(2**10),
        "Mi": Decimal(2**20),
        "Gi": Decimal(2**30),
        "Ti": Decimal(2**40),
        "m": Decimal("0.001"),
    }
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return Decimal(text[: -len(suffix)]) * factor
    return Decimal(text)


def ground_truth(held: dict[str, dict[str, Any]], gpu_model_by_node: dict[str, str]) -> dict[str, Decimal]:
    """Resource-seconds per (customer, meter, gpu model), straight from the pods' timestamps."""
    totals: dict[str, Decimal] = {}
    for pod in held.values():
        seconds = Decimal(int(pod["released"]) - int(pod["bound"]))
        customer = TEAMS[pod["namespace"]]
        for resource, meter in (
            ("nvidia.com/gpu", "gpu-seconds"),
            ("cpu", "cpu-core-seconds"),
            ("memory", "memory-byte-seconds"),
        ):
            if resource not in pod["requests"]:
                continue
            model = gpu_model_by_node[pod["node"]] if meter == "gpu-seconds" else ""
            key = f"{customer}|{meter}|{model}"
            totals[key] = totals.get(key, Decimal(0)) + _quantity(pod["requests"][resource]) * seconds
    return totals


def chargeback_rows(metered: list[dict[str, Any]], pricing: Pricing) -> list[dict[str, Any]]:
    rows = []
    for row in metered:
        meter, value = row.get("type", ""), Decimal(str(row.get("value", 0)))
        model = (row.get("groupBy") or row).get("gpu_model") or ""
        if meter == "gpu-seconds":
            amount, unit = value / 3600, "GPU-hours"
        elif meter == "cpu-core-seconds":
            amount, unit, model = value / 3600, "core-hours", ""
        elif meter == "memory-byte-seconds":
            amount, unit, model = value / 2**30 / 3600, "GiB-hours", ""
        else:
            continue
        price = pricing.price(meter, unit, model)
        if price is None:
            raise SystemExit(f"{PRICING_FILE} has no price for {meter} ({unit} {model}); add one")
        cost = amount * Decimal(repr(price))
        rows.append(
            {
                "subject": row.get("subject", ""),
                "meter": meter,
                "gpu_model": model,
                "value": value,
                "amount": amount,
                "unit": unit,
                "cost_usd": cost,
            }
        )
    return sorted(rows, key=lambda r: (r["subject"], r["meter"], r["gpu_model"]))


def render_table(rows: list[dict[str, Any]], truth: dict[str, Decimal]) -> str:
    header = (
        f"{'customer':<10} {'meter':<20} {'gpu model':<22} {'amount':>12} {'unit':<10} {'cost USD':>10}"
        "  ground truth"
    )
    lines = [header, "-" * len(header)]
    total = Decimal(0)
    for row in rows:
        key = f"{row['subject']}|{row['meter']}|{row['gpu_model']}"
        expected = truth.get(key)
        verdict = "exact" if expected is not None and expected == row["value"] else f"expected {expected}"
        lines.append(
            f"{row['subject']:<10} {row['meter']:<20} {row['gpu_model'] or '-':<22} "
            f"{row['amount']:>12.4f} {row['unit']:<10} {row['cost_usd']:>10.2f}  {verdict}"
        )
        total += row["cost_usd"]
    lines.append("-" * len(header))
    lines.append(f"{'total':<66} {total:>10.2f}")
    return "\n".join(lines)


@contextlib.contextmanager
def interrupted_cleanly(demo: Demo) -> Iterator[None]:
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # Python leaves SIGINT ignored when it starts ignored (a job started with `&` by a non-interactive
    # shell, as CI runners do): Ctrl-C or `kill -INT` must still tear the demo down.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    except KeyboardInterrupt:
        demo.say("interrupted; tearing down")
        raise SystemExit(130) from None
    finally:
        stopping = time.monotonic()
        demo.stop()
        demo.say(f"stopped every process in {time.monotonic() - stopping:.1f} s; state left in {demo.state}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo")
    parser.add_argument(
        "--seconds",
        type=int,
        default=int(os.environ.get("KUBEMETER_DEMO_SECONDS", "90")),
        help="how long the long-running workloads run",
    )
    parser.add_argument("--state", type=Path, default=REPO_ROOT / ".state" / "demo")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "demo-out")
    args = parser.parse_args(argv)
    demo = Demo(args.state.resolve(), out=args.out.resolve(), run_s=args.seconds)
    with interrupted_cleanly(demo):
        demo.start_cluster()
        demo.start_sink()
        demo.say(f"billing sink (kubemeter sink) listening on {demo.sink_url}")
        demo.apply_example()
        demo.start_data_plane()
        chosen = demo.start_workloads()
        demo.run_workloads(chosen)
        demo.wait_for_delivery()
        summary = demo.report()
    metered = {f"{r['subject']}|{r['meter']}|{r['gpu_model']}": r["value"] for r in summary["rows"]}
    differing = sorted(
        k for k in {*metered, *summary["ground_truth"]} if metered.get(k) != summary["ground_truth"].get(k)
    )
    if differing:
        print(f"metered totals differ from the ground truth for: {', '.join(differing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
