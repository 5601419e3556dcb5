"""Accuracy of allocation metering against the anchors' methods, on one synthetic pod-churn trace.

Four meters read the same trace of pods (GPU, MIG, CPU and memory requests; lifetimes from seconds to
hours) and are compared with the ground truth, request x (release - binding), computed directly from
the trace's own numbers:

- ``kubemeter``: the agent's pure core (``billable_interval``, ``effective_quantity_milli``, aligned
  60 s windows) applied to Kubernetes pod objects built from the trace;
- ``openmeter-snapshot-30s``: the OpenMeter collector's method, re-implemented here: every 30 s tick
  lists Running pods and charges each the whole 30 s interval (shared/notes/openmeter-collector.md);
- ``opencost-60s`` / ``opencost-300s``: OpenCost's method: ``kube_pod_container_status_running`` is
  sampled at the query resolution; minutes = last sample - first sample, or one resolution when a
  single sample exists; pods never sampled cost nothing (shared/notes/gpu-and-k8s-sources.md §1.3).

The re-implementations live here, inside the benchmark only. Pods start running at binding (no image
pull delay), so every difference is sampling error, not a difference of definition.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubemeter.metering.pods import billable_interval, effective_quantity_milli
from kubemeter.metering.quantities import parse_quantity_milli
from kubemeter.metering.windows import split_by_windows

ABOUT = "allocation accuracy against the OpenMeter-collector and OpenCost methods"

TRACE_START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
WINDOW_MS = 60_000


@dataclass(frozen=True)
class TracePod:
    uid: str
    resource: str
    quantity: str
    start_ms: int
    end_ms: int

    @property
    def lifetime_s(self) -> float:
        return (self.end_ms - self.start_ms) / 1000


def generate_trace(pod_count: int = 3000, horizon_s: int = 8 * 3600, seed: int = 7) -> list[TracePod]:
    """Pods with whole-second timestamps, as the Kubernetes API records them."""
    rng = random.Random(seed)
    resources: list[tuple[str, list[str]]] = [
        ("nvidia.com/gpu", ["1", "2", "4", "8"]),
        ("nvidia.com/mig-1g.10gb", ["1", "2"]),
        ("cpu", ["250m", "500m", "2", "16"]),
        ("memory", ["512Mi", "4Gi", "64Gi"]),
    ]
    pods: list[TracePod] = []
    for index in range(pod_count):
        kind = rng.random()
        if kind < 0.35:
            lifetime_s = rng.randint(3, 59)  # short jobs: the ones samplers lose
        elif kind < 0.65:
            lifetime_s = rng.randint(60, 1800)
        else:
            lifetime_s = rng.randint(1800, 6 * 3600)
        start_s = rng.randint(0, horizon_s - lifetime_s)
        resource, quantities = resources[index % len(resources)]
        pods.append(
            TracePod(
                uid=f"uid-{index:05d}",
                resource=resource,
                quantity=rng.choice(quantities),
                start_ms=TRACE_START_MS + start_s * 1000,
                end_ms=TRACE_START_MS + (start_s + lifetime_s) * 1000,
            )
        )
    return pods


def _rfc3339(moment_ms: int) -> str:
    return datetime.fromtimestamp(moment_ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod_object(pod: TracePod) -> dict[str, Any]:
    """The finished pod as the API server returns it."""
    return {
        "metadata": {"uid": pod.uid, "name": pod.uid, "creationTimestamp": _rfc3339(pod.start_ms)},
        "spec": {"containers": [{"name": "main", "resources": {"requests": {pod.resource: pod.quantity}}}]},
        "status": {
            "phase": "Succeeded",
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": _rfc3339(pod.start_ms)}
            ],
            "containerStatuses": [
                {
                    "name": "main",
                    "state": {
                        "terminated": {
                            "startedAt": _rfc3339(pod.start_ms),
                            "finishedAt": _rfc3339(pod.end_ms),
                            "exitCode": 0,
                        }
                    },
                }
            ],
        },
    }


# Each meter returns milli-unit-milliseconds, so all four are compared exactly.
def ground_truth(pod: TracePod) -> int:
    return parse_quantity_milli(pod.quantity) * (pod.end_ms - pod.start_ms)


def kubemeter(pod: TracePod) -> int:
    obj = pod_object(pod)
    interval = billable_interval(obj)
    assert interval.end_ms is not None
    quantity_milli = effective_quantity_milli(obj, pod.resource)
    return sum(
        quantity_milli * piece_ms
        for _, piece_ms in split_by_windows(interval.start_ms, interval.end_ms, WINDOW_MS)
    )


def _ticks(start_ms: int, end_ms: int, step_ms: int) -> list[int]:
    """Aligned sampling instants at which the pod is running: start <= t < end."""
    first = start_ms + (-start_ms) % step_ms
    return list(range(first, end_ms, step_ms))


def openmeter_snapshot(pod: TracePod, tick_ms: int = 30_000) -> int:
    return parse_quantity_milli(pod.quantity) * tick_ms * len(_ticks(pod.start_ms, pod.end_ms, tick_ms))


def opencost(pod: TracePod, resolution_ms: int) -> int:
    samples = _ticks(pod.start_ms, pod.end_ms, resolution_ms)
    if not samples:
        return 0
    duration_ms = resolution_ms if len(samples) == 1 else samples[-1] - samples[0]
    return parse_quantity_milli(pod.quantity) * duration_ms


METHODS: dict[str, Callable[[TracePod], int]] = {
    "kubemeter": kubemeter,
    "openmeter-snapshot-30s": openmeter_snapshot,
    "opencost-60s": lambda pod: opencost(pod, 60_000),
    "opencost-300s": lambda pod: opencost(pod, 300_000),
}


def _relative_error(measured: int, truth: int) -> float:
    return abs(measured - truth) / truth if truth else 0.0


def compare(pods: Iterable[TracePod]) -> list[dict[str, Any]]:
    """One figure per method and population: total error, mean per-pod error, pods missed."""
    pods = list(pods)
    populations = {"all": pods, "under-60s": [p for p in pods if p.lifetime_s < 60]}
    figures: list[dict[str, Any]] = []
    for method, meter in METHODS.items():
        for population, members in populations.items():
            truths = [ground_truth(p) for p in members]
            measured = [meter(p) for p in members]
            total_error = _relative_error(sum(measured), sum(truths))
            per_pod = sum(_relative_error(m, t) for m, t in zip(measured, truths, strict=True)) / len(members)
            missed = sum(1 for m, t in zip(measured, truths, strict=True) if t and not m)
            figures += [
                {
                    "name": f"accuracy/{method}/{population}/total-error",
                    "value": round(total_error * 100, 4),
                    "unit": "%",
                    "baseline": "ground truth",
                },
                {
                    "name": f"accuracy/{method}/{population}/mean-per-pod-error",
                    "value": round(per_pod * 100, 4),
                    "unit": "%",
                    "baseline": "ground truth",
                },
                {
                    "name": f"accuracy/{method}/{population}/pods-missed",
                    "value": missed,
                    "unit": f"pods of {len(members)}",
                    "baseline": "ground truth",
                },
            ]
    return figures


def run() -> list[dict[str, Any]]:
    return compare(generate_trace())
