"""How long an agent can be away and still resume its pod watch: measured on the local control plane.

A restarted agent resumes its pod watch from the checkpointed resourceVersion; the API server's watch
cache answers from its history of events, or ``410 Gone`` once that version has left it. This
measures, on the real kube-apiserver of ``testbed``:

* the resume window: a resourceVersion is taken, pods churn at a fixed rate, and a watch from that
  version is tried every few seconds until the API server answers 410; the seconds until then;
* the barrier time: how long the agent's barrier (a LIST, then a bookmark on a fresh watch stream)
  takes on a node whose pods are quiet while other nodes' pods change;
* an API server restart: whether a version from before it can be resumed after it.

    python -m chaos.watch_window [--rates 0,2,20] [--max-s 420]

Prints a table and writes ``chaos/results/watch_window.json``. The clock is this process's own;
410 and bookmarks are the API server's answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from kubemeter.agent.runtime import pod_key
from kubemeter.sources.informer import Informer, now_ms
from kubemeter.sources.kube import KubeApi, KubeCredentials

from testbed.controlplane import REPO_ROOT, ControlPlane

NODE = "kwok-cpu-0"
NAMESPACE = "watch-window"
PROBE_EVERY_S = 5.0


class Api:
    def __init__(self, plane: ControlPlane) -> None:
        self.client = httpx.Client(
            base_url=plane.api_url,
            verify=plane.ssl_context(),
            headers={"Authorization": f"Bearer {plane.token}"},
            timeout=30,
        )

    def pods_version(self) -> str:
        listing = self.client.get(f"/api/v1/namespaces/{NAMESPACE}/pods").raise_for_status().json()
        return str(listing["metadata"]["resourceVersion"])

    def replayable_events(self, version: str) -> int | None:
        """How many pod events a watch from ``version`` replays (what the watch cache holds after
        it), or None when the API server answers 410 Gone (in either form)."""
        params = {"watch": "true", "resourceVersion": version, "timeoutSeconds": "2"}
        events = 0
        with self.client.stream("GET", "/api/v1/pods", params=params) as response:
            if response.status_code == 410:
                return None
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.strip():
                    continue
                event = json.loads(line)
                if event["type"] == "ERROR" and event["object"].get("code") == 410:
                    return None
                if event["type"] != "BOOKMARK":
                    events += 1
        return events

    def resumable(self, version: str) -> bool:
        return self.replayable_events(version) is not None


def barrier_seconds(plane: ControlPlane, rounds: int) -> list[float]:
    """The agent's own pod informer on ``NODE``, ``rounds`` barriers 2 s apart, each timed."""

    async def measure() -> list[float]:
        api = KubeApi(KubeCredentials.from_kubeconfig(plane.kubeconfig))
        pods = Informer(api, "/api/v1/pods", {"fieldSelector": f"spec.nodeName={NODE}"}, pod_key, "pods")
        watch = asyncio.create_task(pods.run())
        try:
            await asyncio.wait_for(pods.synced.wait(), 30)
            times = []
            for _ in range(rounds):
                await asyncio.sleep(2)
                started = time.monotonic()
                if await pods.catch_up(now_ms(), timeout_s=70):
                    times.append(round(time.monotonic() - started, 2))
                else:
                    times.append(float("nan"))
            return times
        finally:
            watch.cancel()
            await api.close()

    return asyncio.run(measure())


@contextmanager
def churning(api: Api, pods_per_s: float, node: str = NODE) -> Iterator[list[int]]:
    """Create and force-delete pods at ``pods_per_s`` (each is ADDED, MODIFIED by kwok, DELETED)."""
    stop = threading.Event()
    count = [0]

    def run() -> None:
        index = 0
        while pods_per_s > 0 and not stop.wait(1 / pods_per_s):
            name = f"w-{index:06d}"
            index += 1
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name},
                "spec": {
                    "nodeName": node,
                    "tolerations": [{"operator": "Exists"}],
                    "containers": [{"name": "c", "image": "fake"}],
                },
            }
            base = f"/api/v1/namespaces/{NAMESPACE}/pods"
            if api.client.post(base, json=pod).status_code == 201:
                api.client.delete(f"{base}/{name}", params={"gracePeriodSeconds": "0"})
                count[0] += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield count
    finally:
        stop.set()
        thread.join(30)


def resume_window(api: Api, pods_per_s: float, max_s: float) -> dict[str, Any]:
    with churning(api, pods_per_s) as created:
        if pods_per_s:
            time.sleep(min(90.0, max_s / 4))  # let the cache size itself to this rate first
        version = api.pods_version()
        created_before = created[0]
        taken = time.monotonic()
        last_ok_s, last_events = 0.0, 0
        while time.monotonic() - taken < max_s:
            time.sleep(PROBE_EVERY_S)
            elapsed_s = time.monotonic() - taken
            events = api.replayable_events(version)
            if events is None:
                return {
                    "pods_per_s": pods_per_s,
                    "pods_created_since": created[0] - created_before,
                    "resumable_s": round(last_ok_s, 1),
                    "events_replayed_at_last_resume": last_events,
                    "gone_at_s": round(elapsed_s, 1),
                }
            last_ok_s, last_events = elapsed_s, events
    return {
        "pods_per_s": pods_per_s,
        "pods_created_since": created[0] - created_before,
        "resumable_s": round(last_ok_s, 1),
        "events_replayed_at_last_resume": last_events,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m chaos.watch_window", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--rates", default="0,2,20", help="pods per second to churn, comma-separated")
    parser.add_argument("--max-s", type=float, default=420, help="longest wait for a 410, per rate")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "chaos" / "results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="watch-window-") as state:
        plane = ControlPlane(Path(state))
        plane.start()
        try:
            api = Api(plane)
            api.client.post(
                "/api/v1/namespaces",
                json={"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
            ).raise_for_status()
            with churning(api, 2.0, node="kwok-gpu-0"):
                busy_s = barrier_seconds(plane, 8)
            quiet_s = barrier_seconds(plane, 8)
            print(f"barrier while other nodes churn: {busy_s} s; on a quiet cluster: {quiet_s} s")
            windows = []
            for rate in [float(r) for r in args.rates.split(",")]:
                window = resume_window(api, rate, args.max_s)
                print(f"churn {rate:g} pods/s: {window}")
                windows.append(window)
            version = api.pods_version()
            apiserver = next(c for c in plane.components if c.name == "kube-apiserver")
            apiserver.stop()
            apiserver.start()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if api.client.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            after_restart = api.resumable(version)
            print(f"a version from before an API server restart resumable after it: {after_restart}")
        finally:
            plane.stop()
    result = {
        "barrier_s_other_nodes_churning": busy_s,
        "barrier_s_quiet_cluster": quiet_s,
        "resume_windows": windows,
        "resumable_across_apiserver_restart": after_restart,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "watch_window.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
