"""What one operator resync spends learning the agents' source faults, at 100 and 1,000 agents.

Agents push their fault set to their gateway when it changes (and re-post it while faulted); the
operator reads each gateway replica's ``/status`` (issue 16: the old design GET every agent's
``/healthz`` every resync, 0.76 ms of operator CPU per agent). Per agent count N, against a real
``kubemeter gateway`` process (one replica, ingest token on):

- ``operator/resync-<N>-agents/cpu`` and ``/wall``: *nothing changed*: every one of the N stand-in
  agents posted its report once (as each does when it starts), :data:`FAULTED` of them with a fault
  that they keep re-posting, and the clean ones' reports have aged out (the gateway runs with a
  :data:`TTL_S` TTL here instead of 90 s, so the bench does not wait minutes). One resync's read is
  the operator's own ``read_gateway_reports`` + ``known_source_faults``; median of
  :data:`RESYNC_REPEATS` reads, CPU of this process. The two agent counts have a gateway each,
  running side by side, and the reads alternate between them (this machine is shared and noisy).
- ``.../cpu-after-rollout``: the same read right after all N agents posted (a DaemonSet rollout:
  every report is new and still in the table), the case that does grow with N.
- ``gateway/agent-report-cpu-per-post``: the gateway process's CPU per report it received
  (``/proc/<pid>/stat``), what a change costs on the other side.
- ``operator/resync-cpu-ratio-<N>-over-<M>``: steady-state CPU at the larger count over the smaller.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from kubemeter.api.rendered import AGENT_REPORT_PATH, GATEWAY_STATUS_PATH, AgentFaultReport, GatewayConfig
from kubemeter_operator.reconcile import read_gateway_reports
from kubemeter_operator.settings import OperatorSettings
from kubemeter_operator.status import known_source_faults

from bench import plots
from bench.bench_operator import cpu_seconds, kubemeter_process, wait_until
from testbed.controlplane import free_port

ABOUT = "operator resync cost of the agents' source faults vs agents (100, 1,000), via the gateway"

AGENT_COUNTS = (100, 1000)
FAULTED = 5
TTL_S = 4.0
REFRESH_S = 1.0
RESYNC_REPEATS = 50
TOKEN = "bench-ingest-token"


def _report(index: int, faulted: bool) -> bytes:
    faults = {"bench/gpu-energy": "nvml unavailable: no driver"} if faulted else {}
    report = AgentFaultReport(node=f"node-{index:04d}", sent_at=time.time(), source_faults=faults)
    return report.model_dump_json(by_alias=True).encode()


def _post_all(client: httpx.Client, url: str, indexes: range, faulted: int) -> None:
    for index in indexes:
        response = client.post(url, content=_report(index, index < faulted))
        if response.status_code != 204:
            raise RuntimeError(f"the gateway answered {response.status_code}: {response.text}")


def _one_resync(urls: list[str]) -> tuple[float, float, int]:
    """Wall and CPU seconds of the operator's read, and how many source faults it found."""
    cpu_before, started = time.process_time(), time.perf_counter()
    reports = read_gateway_reports(urls, OperatorSettings().gateway_status_timeout_seconds)
    faults = known_source_faults(reports, replicas=1)
    wall_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_before
    if faults is None:
        raise RuntimeError("the gateway did not answer, or is not complete yet")
    return wall_s, cpu_s, len(faults)


@contextlib.contextmanager
def gateway_process(directory: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real ``kubemeter gateway`` (ingest token on, report TTL :data:`TTL_S`) and its base URL."""
    directory.mkdir(parents=True)
    port = free_port()
    (directory / "token").write_text(TOKEN + "\n")
    config = GatewayConfig.model_validate(
        {
            "cluster": "bench",
            "collector": "bench",
            "namespace": "bench",
            "output": {"type": "cloudevents", "url": f"http://127.0.0.1:{free_port()}"},
            "bufferMaxBytes": 64 * 2**20,
            "dataDir": str(directory / "pv"),
            "listenAddress": f"127.0.0.1:{port}",
            "ingestTokenFile": str(directory / "token"),
            "agentReportTtlSeconds": TTL_S,
        }
    )
    (directory / "gateway.yaml").write_text(config.to_yaml())
    args = ["gateway", "--config", str(directory / "gateway.yaml")]
    with kubemeter_process(args, directory / "gateway.log") as gateway:
        yield gateway, f"http://127.0.0.1:{port}"


def measure(directory: Path) -> dict[int, dict[str, float]]:
    """One gateway per agent count, side by side; the steady-state reads alternate between them."""
    results: dict[int, dict[str, float]] = {}
    with contextlib.ExitStack() as stack:
        client = stack.enter_context(httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10))
        gateways = {n: stack.enter_context(gateway_process(directory / f"gateway-{n}")) for n in AGENT_COUNTS}
        # What the operator finds listing a Collector's gateway pods: one replica, at this address.
        urls = {n: [f"{base}{GATEWAY_STATUS_PATH}"] for n, (_, base) in gateways.items()}

        def complete(base: str) -> bool:
            try:
                return bool(client.get(f"{base}{GATEWAY_STATUS_PATH}").json().get("agentReportsComplete"))
            except httpx.HTTPError:
                return False

        for agents, (gateway, base) in gateways.items():
            wait_until(functools.partial(complete, base), 60, 0.1, "the gateway to answer, complete")
            cpu_before = cpu_seconds(gateway.pid)
            _post_all(client, base + AGENT_REPORT_PATH, range(agents), FAULTED)
            gateway_cpu_s = cpu_seconds(gateway.pid) - cpu_before
            _, rollout_cpu_s, found = _one_resync(urls[agents])
            if found != FAULTED:
                raise RuntimeError(f"{found} source faults read after the rollout, {FAULTED} posted")
            results[agents] = {
                "rollout_cpu_s": rollout_cpu_s,
                "gateway_cpu_per_post_s": gateway_cpu_s / agents,
            }
        # Nothing changes from here: the faulted agents re-post every REFRESH_S, the rest stay quiet.
        deadline = time.monotonic() + TTL_S + 1.0
        while time.monotonic() < deadline:
            for _, base in gateways.values():
                _post_all(client, base + AGENT_REPORT_PATH, range(FAULTED), FAULTED)
            time.sleep(REFRESH_S)
        samples: dict[int, list[tuple[float, float, int]]] = {n: [] for n in AGENT_COUNTS}
        for _ in range(RESYNC_REPEATS):
            for agents in AGENT_COUNTS:
                samples[agents].append(_one_resync(urls[agents]))
        for agents, (_, base) in gateways.items():
            entries = len(client.get(f"{base}{GATEWAY_STATUS_PATH}").json().get("agentReports") or [])
            if entries != FAULTED or any(found != FAULTED for _, _, found in samples[agents]):
                raise RuntimeError(f"{entries} reports left after the TTL, expected the {FAULTED} refreshed")
            results[agents]["wall_s"] = statistics.median(s[0] for s in samples[agents])
            results[agents]["cpu_s"] = statistics.median(s[1] for s in samples[agents])
    return results


def run() -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="kubemeter-bench-resync-") as scratch:
        results = measure(Path(scratch))
    for agents, result in results.items():
        print(f"{agents} agents: {result}", flush=True)
    interval_s = OperatorSettings().resync_seconds
    figures: list[dict[str, Any]] = []
    for agents, result in results.items():
        figures += [
            {
                "name": f"operator/resync-{agents}-agents/wall",
                "value": round(result["wall_s"], 4),
                "unit": f"s to read the agents' faults once, nothing changed ({FAULTED} faulted, median)",
                "baseline": f"resync interval {interval_s:.0f} s",
            },
            {
                "name": f"operator/resync-{agents}-agents/cpu",
                "value": round(result["cpu_s"], 4),
                "unit": f"s of operator CPU per resync, nothing changed ({FAULTED} faulted, median)",
                "baseline": f"operator/resync-{AGENT_COUNTS[0]}-agents/cpu",
            },
            {
                "name": f"operator/resync-{agents}-agents/cpu-after-rollout",
                "value": round(result["rollout_cpu_s"], 4),
                "unit": f"s of operator CPU, the resync right after all {agents} agents posted",
                "baseline": f"operator/resync-{agents}-agents/cpu",
            },
            {
                "name": f"gateway/agent-report-cpu-per-post-{agents}-agents",
                "value": round(1000 * result["gateway_cpu_per_post_s"], 3),
                "unit": "ms of gateway CPU per agent report received (only on a change or a refresh)",
                "baseline": "the old design: 0.76 ms of operator CPU per agent per resync",
            },
        ]
    small, large = AGENT_COUNTS[0], AGENT_COUNTS[-1]
    figures.append(
        {
            "name": f"operator/resync-cpu-ratio-{large}-over-{small}",
            "value": round(results[large]["cpu_s"] / results[small]["cpu_s"], 2),
            "unit": "ratio of steady-state CPU per resync",
            "baseline": f"{large / small:.0f} if it grew with the agents; goal ~1",
        }
    )
    plots.line_plot(
        "operator-resync-vs-agents",
        "Operator resync: learning the agents' source faults",
        "agents (nodes)",
        "ms of operator CPU per resync",
        {
            "nothing changed": [(n, 1000 * r["cpu_s"]) for n, r in results.items()],
            "right after a rollout": [(n, 1000 * r["rollout_cpu_s"]) for n, r in results.items()],
        },
    )
    return figures
