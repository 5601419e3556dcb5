"""Pod churn: pods created and deleted all through the run, and the ledger of what the API server
recorded for each (the ground truth).

A background thread keeps ``live_target`` pods of the current cohort (the fault in progress), each
with a random shape, node and lifetime, and deletes them when their lifetime is up. Our own DELETE
answers with the pod as stored: ``PodScheduled`` (bound) and ``deletionTimestamp - grace`` (released)
are read from it, and nothing of the agents is consulted.

Deletions go on whatever the agents are doing: while an agent is down, in the second before it is
killed, while the API server is away (then they wait for it, as any client would). A restarted agent
resumes its pod watch and the API server's watch cache delivers the final state of every pod that
ended meanwhile (docs/metering.md, "Checkpoints and restarts"), so each such pod is billed exactly.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from chaos.verdict import PodLife, parse_time_ms

# (requests, nodes it may run on). Requests equal limits, so both bases bill the same.
GPU_NODES = ("kwok-gpu-0", "kwok-gpu-1", "kwok-gpu-2")
ALL_NODES = (*GPU_NODES, "kwok-mig-0", "kwok-cpu-0")
SHAPES: tuple[tuple[dict[str, str], tuple[str, ...]], ...] = (
    ({"nvidia.com/gpu": "1", "cpu": "4", "memory": "16Gi"}, GPU_NODES),
    ({"nvidia.com/gpu": "2", "cpu": "500m", "memory": "1536Mi"}, GPU_NODES),
    ({"cpu": "2", "memory": "4Gi"}, ALL_NODES),
    ({"cpu": "250m", "memory": "640Mi"}, ALL_NODES),
)
MIG_SHAPE = ({"nvidia.com/mig-1g.10gb": "1", "cpu": "1", "memory": "8Gi"}, ("kwok-mig-0",))


@dataclass
class ChurnPod:
    namespace: str
    name: str
    cohort: str
    customer: str
    node: str
    requests: dict[str, str]
    end_at: float  # monotonic
    uid: str = ""
    bound_ms: int | None = None
    released_ms: int | None = None
    deleted: bool = False
    claimed: bool = False  # one thread is deleting it

    def life(self) -> PodLife:
        return PodLife(
            namespace=self.namespace,
            name=self.name,
            cohort=self.cohort,
            customer=self.customer,
            requests=dict(self.requests),
            node=self.node,
            bound_ms=self.bound_ms,
            released_ms=self.released_ms,
        )


Api = Callable[..., Any]


@dataclass
class Churn:
    api: Api  # Stack.api: (method, path, body=None) -> JSON
    customers: dict[str, str]  # namespace -> customer
    live_target: int = 6
    lifetime_s: tuple[float, float] = (3.0, 14.0)
    seed: int = 8
    cohort: str = "setup"
    retired_nodes: set[str] = field(default_factory=set)  # no new pods
    suspended: bool = False  # no API calls at all (the API server is down)
    creating: bool = True
    allow_mig: bool = False
    pods: list[ChurnPod] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    deletions_on: dict[str, int] = field(default_factory=dict)  # node -> pods deleted there
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.random = random.Random(self.seed)
        self.sequence = 0

    # ---- control ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="churn", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def begin(self, cohort: str) -> None:
        with self._lock:
            self.cohort = cohort

    def end_one_on(self, node: str) -> ChurnPod | None:
        """Delete one live pod of the current cohort on ``node`` now (the moment before a kill)."""
        with self._lock:
            live = [
                p
                for p in self.pods
                if p.node == node and not p.deleted and not p.claimed and p.end_at != float("inf")
            ]
            if not live or self.suspended:
                return None
            pod = self.random.choice(live)
            pod.claimed = True
        self._delete(pod)
        return pod if pod.deleted else None

    @contextlib.contextmanager
    def suspend(self) -> Iterator[None]:
        with self._lock:
            self.suspended = True
        try:
            yield
        finally:
            with self._lock:
                self.suspended = False

    def retire(self, node: str) -> list[ChurnPod]:
        """No new pods on ``node``; its pods end now. Returns them."""
        with self._lock:
            self.retired_nodes.add(node)
            ending = [p for p in self.pods if p.node == node and not p.deleted]
            for pod in ending:
                pod.end_at = 0.0
        return ending

    def end_all(self) -> None:
        with self._lock:
            self.creating = False
            for pod in self.pods:
                pod.end_at = 0.0

    def add_long_lived(self, node: str, requests: dict[str, str]) -> ChurnPod:
        """A pod that lives until :meth:`end_all` (or its node is retired): it spans every fault."""
        pod = self._create("long-lived", node, requests, end_at=float("inf"))
        if pod is None:
            raise RuntimeError(f"could not create the long-lived pod on {node}: {self.errors[-1:]}")
        return pod

    def live(self) -> list[ChurnPod]:
        with self._lock:
            return [p for p in self.pods if not p.deleted]

    def lives(self) -> list[PodLife]:
        with self._lock:
            return [p.life() for p in self.pods]

    # ---- the loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(0.3):
            with self._lock:
                if self.suspended:
                    continue
            try:
                self._tick()
            except (OSError, ValueError, KeyError) as error:
                self.errors.append(f"{type(error).__name__}: {error}")

    def _tick(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [p for p in self.pods if not p.deleted and not p.claimed and p.end_at <= now]
            live = [p for p in self.pods if not p.deleted and p.cohort == self.cohort]
            creating = self.creating
        for pod in due:
            with self._lock:
                if self.suspended or pod.deleted or pod.claimed:
                    continue
                pod.claimed = True
            self._delete(pod)
        if creating and len(live) < self.live_target:
            shape, nodes = self._shape()
            choices = [n for n in nodes if n not in self.retired_nodes]
            if choices:
                node = self.random.choice(choices)
                lifetime_s = self.random.uniform(*self.lifetime_s)
                self._create(self.cohort, node, shape, end_at=now + lifetime_s)

    def _shape(self) -> tuple[dict[str, str], tuple[str, ...]]:
        if self.allow_mig and self.random.random() < 0.3:
            return MIG_SHAPE
        return self.random.choice(SHAPES)

    def _create(self, cohort: str, node: str, requests: dict[str, str], *, end_at: float) -> ChurnPod | None:
        with self._lock:
            self.sequence += 1
            namespace = list(self.customers)[self.sequence % len(self.customers)]
            pod = ChurnPod(
                namespace=namespace,
                name=f"{cohort}-{self.sequence:04d}",
                cohort=cohort,
                customer=self.customers[namespace],
                node=node,
                requests=dict(requests),
                end_at=end_at,
            )
        manifest = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod.name,
                "namespace": pod.namespace,
                "labels": {"chaos.kubemeter.io/cohort": cohort},
            },
            "spec": {
                "nodeSelector": {"kubernetes.io/hostname": node},
                "containers": [
                    {
                        "name": "main",
                        "image": "registry.local/workload:1",
                        "resources": {"requests": requests, "limits": requests},
                    }
                ],
            },
        }
        try:
            created = self.api("POST", f"/api/v1/namespaces/{pod.namespace}/pods", manifest)
        except (OSError, urllib.error.HTTPError) as error:
            self.errors.append(f"create {pod.name}: {error}")
            return None
        pod.uid = created["metadata"]["uid"]
        with self._lock:
            self.pods.append(pod)
        return pod

    def _delete(self, pod: ChurnPod) -> None:
        path = f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}"
        try:
            deleted = self.api("DELETE", path)
        except urllib.error.HTTPError as error:
            if error.code != 404:
                pod.claimed = False  # the next tick tries again
                raise
            # Deleted by someone else (it should not be): nothing recorded its release here.
            self.errors.append(f"{pod.name} was already gone when its lifetime ended")
            pod.deleted = True
            return
        except OSError:
            pod.claimed = False
            raise
        self._record(pod, deleted)

    def _record(self, pod: ChurnPod, deleted: dict[str, Any]) -> None:
        metadata, status = deleted["metadata"], deleted.get("status") or {}
        for condition in status.get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "True":
                pod.bound_ms = parse_time_ms(condition["lastTransitionTime"])
        bound_node = (deleted.get("spec") or {}).get("nodeName")
        if bound_node and bound_node != pod.node:
            self.errors.append(f"{pod.name} ran on {bound_node}, not {pod.node}")
        grace_ms = int(metadata.get("deletionGracePeriodSeconds") or 0) * 1000
        pod.released_ms = parse_time_ms(metadata["deletionTimestamp"]) - grace_ms
        with self._lock:
            pod.deleted = True
            self.deletions_on[pod.node] = self.deletions_on.get(pod.node, 0) + 1

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return {
                "pods": len(self.pods),
                "bound": sum(1 for p in self.pods if p.bound_ms is not None),
                "live": sum(1 for p in self.pods if not p.deleted),
                "errors": self.errors[-10:],
            }
