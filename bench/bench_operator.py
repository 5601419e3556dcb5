"""Operator convergence and memory on the real local control plane (issue 3).

- ``operator/collector-children``: from ``kubectl apply`` of the Collector of
  ``examples/gpu-chargeback.yaml`` (its Secret, Meters and Pipeline already applied and seen by the
  operator) until every object ``build_children`` says it owns exists in the API server, polled every
  20 ms over HTTP. Repeated in fresh namespaces; median and worst reported.
- ``operator/meters-<M>/converge``: for M = 100, 500 and 2,000, a new namespace gets 50 Collectors,
  50 Pipelines (one per Collector, by label selector) and M Meters (M/50 per Collector) in one
  ``kubectl apply``; from the start of the apply until every Collector's ConfigMap lists exactly its
  Meters in ``agent.yaml``. The steps run in that order in one cluster and one operator, so the
  operator holds the earlier steps' objects too (100, 600, then 2,600 Meters in all).
- ``operator/meters-<M>/rss``: the operator's VmRSS (``/proc/<pid>/status``, sampled every 100 ms)
  at the end of that step, 1 s after it converged; ``operator/rss-peak`` is the largest sample.

What a resync spends on the agents' source faults is :mod:`bench.bench_operator_resync`.

The operator runs as a subprocess (``kubemeter operator --standalone``) with its production defaults.
Shared helpers (control plane, API client, process sampler) are imported by the other benchmarks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from kubemeter.api.collector import CollectorSpec
from kubemeter_operator.builders import CollectorRef, build_children
from kubemeter_operator.settings import OperatorSettings

from bench import plots
from testbed.controlplane import REPO_ROOT, ControlPlane, FakeNode

ABOUT = "operator convergence and RSS vs Meters (100, 500, 2,000 over 50 Collectors)"

EXAMPLE = REPO_ROOT / "examples" / "gpu-chargeback.yaml"
CHILDREN_GOAL_S = 2.0
CONVERGE_GOAL_S = 60.0
RSS_GOAL_MIB = 150.0
CHILDREN_REPEATS = 3
COLLECTORS = 50
METER_STEPS = (100, 500, 2000)
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


# ---- shared helpers ------------------------------------------------------------------------------


@contextlib.contextmanager
def control_plane(state_dir: Path, nodes: list[FakeNode] | None = None) -> Iterator[ControlPlane]:
    """The local control plane (the default fake nodes unless ``nodes``) with the CRDs installed."""
    plane = ControlPlane(state_dir) if nodes is None else ControlPlane(state_dir, nodes=nodes)
    plane.start()
    try:
        plane.kubectl("apply", "--server-side", "-f", str(REPO_ROOT / "crds"))
        plane.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        yield plane
    finally:
        plane.stop()


def api_client(plane: ControlPlane) -> httpx.Client:
    """Direct HTTP to the API server: polling through kubectl would cost ~100 ms per look."""
    return httpx.Client(
        base_url=plane.api_url,
        headers={"Authorization": f"Bearer {plane.token}"},
        verify=plane.ssl_context(),
        timeout=30.0,
    )


def wait_until(predicate: Callable[[], Any], timeout_s: float, interval_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (fields 14 and 15 of /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


@dataclass
class RssSampler:
    """Samples a process's RSS in a thread: the peak is what a memory limit must allow."""

    pid: int
    interval_s: float = 0.1
    peak_bytes: int = 0
    last_bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name=f"rss-{self.pid}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                self.last_bytes = rss_bytes(self.pid)
                self.peak_bytes = max(self.peak_bytes, self.last_bytes)
            self._stop.wait(self.interval_s)


def kubemeter_process(
    args: list[str], log_path: Path, env: dict[str, str] | None = None
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """``python -m kubemeter_cli <args>``, stopped with SIGTERM (then SIGKILL) on exit."""
    return python_process(["-m", "kubemeter_cli", *args], log_path, env)


@contextlib.contextmanager
def python_process(
    argv: list[str], log_path: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """``python <argv>`` in its own session, logging to ``log_path``; stopped on exit."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, *argv],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            cwd=REPO_ROOT,
            start_new_session=True,
        )
    try:
        yield process
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def check_alive(process: subprocess.Popen[bytes], log_path: Path) -> None:
    if process.poll() is not None:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{log_path.stem} exited with {process.returncode}:\n{tail}")


def mib(value_bytes: int) -> float:
    return round(value_bytes / 2**20, 1)


# ---- this benchmark -----------------------------------------------------------------------------


def api_path(manifest: dict[str, Any]) -> str:
    """The REST path of one object; every kind the operator owns has the plural ``<kind>s``."""
    api_version = manifest["apiVersion"]
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    meta = manifest["metadata"]
    where = f"/namespaces/{meta['namespace']}" if "namespace" in meta else ""
    return f"{prefix}{where}/{manifest['kind'].lower()}s/{meta['name']}"


def expected_children(namespace: str, collector: dict[str, Any]) -> list[str]:
    """The paths of what the operator must create, from the same pure builders it uses."""
    spec = CollectorSpec.model_validate(collector["spec"])
    # The uid only fills ownerReferences, which do not change where an object lives.
    ref = CollectorRef(namespace=namespace, name=collector["metadata"]["name"], uid="")
    return [api_path(m) for m in build_children(ref, spec, [], OperatorSettings())]


def all_exist(client: httpx.Client, paths: list[str]) -> bool:
    return all(client.get(path).status_code == 200 for path in paths)


def collector_children_s(plane: ControlPlane, client: httpx.Client, namespace: str) -> tuple[float, int]:
    """Seconds from apply to every child existing, and how many children that is."""
    documents = list(yaml.safe_load_all(EXAMPLE.read_text()))
    (collector,) = [d for d in documents if d["kind"] == "Collector"]
    others = [d for d in documents if d["kind"] != "Collector"]
    plane.kubectl("create", "namespace", namespace)
    plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(others))
    # The Pipeline's status shows the operator has seen it; the clock then measures only the Collector.
    pipeline = f"/apis/kubemeter.io/v1alpha1/namespaces/{namespace}/pipelines/compute"
    wait_until(lambda: client.get(pipeline).json().get("status"), 60, 0.1, "the operator to see the Pipeline")
    paths = expected_children(namespace, collector)
    started = time.perf_counter()
    plane.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(collector))
    wait_until(lambda: all_exist(client, paths), 60, 0.02, f"the children of {namespace}/chargeback")
    return time.perf_counter() - started, len(paths)


def many_meters_manifest(namespace: str, meters_per_collector: int) -> dict[str, Any]:
    """:data:`COLLECTORS` Collectors, each bound by one Pipeline (label selector) to its Meters."""
    items: list[dict[str, Any]] = []
    for c in range(COLLECTORS):
        name = f"collector-{c}"
        items.append(
            {
                "apiVersion": "kubemeter.io/v1alpha1",
                "kind": "Collector",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"output": {"type": "cloudevents", "url": "http://sink.billing.svc:8080"}},
            }
        )
        items.append(
            {
                "apiVersion": "kubemeter.io/v1alpha1",
                "kind": "Pipeline",
                "metadata": {"name": f"pipeline-{c}", "namespace": namespace},
                "spec": {"collectorRef": name, "meterSelector": {"matchLabels": {"bench/collector": name}}},
            }
        )
        for m in range(meters_per_collector):
            items.append(
                {
                    "apiVersion": "kubemeter.io/v1alpha1",
                    "kind": "Meter",
                    "metadata": {
                        "name": f"meter-{c}-{m}",
                        "namespace": namespace,
                        "labels": {"bench/collector": name},
                    },
                    "spec": {
                        "eventType": f"cpu-core-seconds-{m}",
                        "unit": "core-seconds",
                        "source": {"allocation": {"resource": "cpu"}},
                    },
                }
            )
    return {"apiVersion": "v1", "kind": "List", "items": items}


def converged(client: httpx.Client, namespace: str, meters_per_collector: int) -> bool:
    listed = client.get(
        f"/api/v1/namespaces/{namespace}/configmaps", params={"labelSelector": "kubemeter.io/collector"}
    ).json()
    meters_by_collector: dict[str, set[str]] = {}
    for config_map in listed.get("items", []):
        agent_yaml = (config_map.get("data") or {}).get("agent.yaml")
        if agent_yaml is None:
            continue
        config = yaml.load(agent_yaml, Loader=yaml.CSafeLoader)
        meters_by_collector[config["collector"]] = {m["name"] for m in config.get("meters") or []}
    return all(
        meters_by_collector.get(f"collector-{c}") == {f"meter-{c}-{m}" for m in range(meters_per_collector)}
        for c in range(COLLECTORS)
    )


def many_meters_converge_s(
    plane: ControlPlane, client: httpx.Client, namespace: str, meters: int
) -> tuple[float, float]:
    """Seconds from the start of the apply to convergence, and how long the apply alone took."""
    per_collector = meters // COLLECTORS
    plane.kubectl("create", "namespace", namespace)
    manifest = json.dumps(many_meters_manifest(namespace, per_collector))
    started = time.perf_counter()
    plane.kubectl("apply", "-f", "-", input=manifest, timeout_s=600)
    applied_s = time.perf_counter() - started
    what = f"{meters} Meters in {COLLECTORS} ConfigMaps"
    wait_until(lambda: converged(client, namespace, per_collector), 600, 0.5, what)
    return time.perf_counter() - started, applied_s


def measure(state_dir: Path) -> dict[str, Any]:
    with control_plane(state_dir / "cluster") as plane, api_client(plane) as client:
        log = state_dir / "operator.log"
        env = {"KUBECONFIG": str(plane.kubeconfig), "KUBEMETER_CLUSTER_NAME": "bench"}
        args = ["operator", "--standalone", "--liveness-port", "0", "--metrics-port", "0"]
        with kubemeter_process(args, log, env) as operator, RssSampler(operator.pid) as rss:
            children_s, child_count = [], 0
            for repeat in range(CHILDREN_REPEATS):
                seconds, child_count = collector_children_s(plane, client, f"bench-children-{repeat}")
                children_s.append(seconds)
                check_alive(operator, log)
            steps: dict[int, dict[str, float]] = {}
            for meters in METER_STEPS:
                converge_s, applied_s = many_meters_converge_s(
                    plane, client, f"bench-meters-{meters}", meters
                )
                check_alive(operator, log)
                time.sleep(1.0)  # one more RSS sample once the burst is over
                steps[meters] = {"converge_s": converge_s, "applied_s": applied_s, "rss": rss.last_bytes}
                print(
                    f"{meters} Meters: converged in {converge_s:.1f} s, RSS {mib(rss.last_bytes)} MiB",
                    flush=True,
                )
        return {
            "children_s": children_s,
            "child_count": child_count,
            "steps": steps,
            "rss_peak": rss.peak_bytes,
        }


def run() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="kubemeter-bench-operator-") as scratch:
        result = measure(Path(scratch))
    children_s: list[float] = result["children_s"]
    steps: dict[int, dict[str, float]] = result["steps"]
    figures: list[dict[str, Any]] = [
        {
            "name": "operator/collector-children/median",
            "value": round(statistics.median(children_s), 3),
            "unit": f"s (apply to {result['child_count']} children, {len(children_s)} runs)",
            "baseline": f"goal < {CHILDREN_GOAL_S} s",
        },
        {
            "name": "operator/collector-children/worst",
            "value": round(max(children_s), 3),
            "unit": "s",
            "baseline": f"goal < {CHILDREN_GOAL_S} s",
        },
    ]
    for meters, step in steps.items():
        figures += [
            {
                "name": f"operator/meters-{meters}/converge",
                "value": round(step["converge_s"], 1),
                "unit": f"s ({COLLECTORS} Collectors, {meters} Meters, apply included)",
                "baseline": f"goal < {CONVERGE_GOAL_S:.0f} s (issue 3: 500 Meters)",
            },
            {
                "name": f"operator/meters-{meters}/apply-alone",
                "value": round(step["applied_s"], 1),
                "unit": "s (the kubectl apply alone, part of the figure above)",
                "baseline": f"operator/meters-{meters}/converge",
            },
            {
                "name": f"operator/meters-{meters}/rss",
                "value": mib(int(step["rss"])),
                "unit": "MiB after convergence (earlier steps' objects still held)",
                "baseline": f"goal < {RSS_GOAL_MIB:.0f} MiB",
            },
        ]
    figures.append(
        {
            "name": "operator/rss-peak",
            "value": mib(result["rss_peak"]),
            "unit": "MiB",
            "baseline": f"goal < {RSS_GOAL_MIB:.0f} MiB",
        }
    )
    plots.line_plot(
        "operator-converge-vs-meters",
        f"Operator convergence vs Meters ({COLLECTORS} Collectors)",
        "Meters applied at once",
        "seconds, apply to every ConfigMap",
        {"kubemeter operator": [(m, step["converge_s"]) for m, step in steps.items()]},
    )
    plots.line_plot(
        "operator-rss-vs-meters",
        "Operator RSS vs Meters (cumulative steps)",
        "Meters in the step",
        "MiB",
        {"kubemeter operator": [(m, step["rss"] / 2**20) for m, step in steps.items()]},
    )
    return figures
