"""The Kubernetes billing rules: when a pod holds resources and how much (docs/metering.md)."""

from __future__ import annotations

from typing import Any

from kubemeter.metering.intervals import Interval
from kubemeter.metering.pods import (
    billable_interval,
    deletion_requested_ms,
    effective_quantity_milli,
    parse_time_ms,
)

CREATED = "2024-05-01T10:00:00Z"
T_CREATED = parse_time_ms(CREATED)


def pod(**parts: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "metadata": {"name": "p", "namespace": "n", "uid": "u", "creationTimestamp": CREATED},
        "spec": {"nodeName": "node-1", "containers": [{"name": "main"}]},
        "status": {"phase": "Pending"},
    }
    for key, value in parts.items():
        body[key].update(value)
    return body


def scheduled(at: str) -> dict[str, Any]:
    return {"type": "PodScheduled", "status": "True", "lastTransitionTime": at}


def terminated(finished_at: str) -> dict[str, Any]:
    return {"name": "main", "state": {"terminated": {"exitCode": 0, "finishedAt": finished_at}}}


def test_a_pending_but_bound_pod_is_billed_from_binding() -> None:
    pending = pod(status={"phase": "Pending", "conditions": [scheduled("2024-05-01T10:00:02Z")]})
    assert billable_interval(pending) == Interval(T_CREATED + 2_000, None)


def test_a_pod_created_on_its_node_is_bound_at_creation() -> None:
    assert billable_interval(pod()).start_ms == T_CREATED


def test_seven_second_job_holds_its_gpu_from_binding_to_last_container_exit() -> None:
    done = pod(
        status={
            "phase": "Succeeded",
            "conditions": [scheduled("2024-05-01T10:00:01Z")],
            "containerStatuses": [terminated("2024-05-01T10:00:08Z")],
        }
    )
    interval = billable_interval(done)
    assert interval.end_ms is not None and interval.end_ms - interval.start_ms == 7_000


def test_a_deleted_pod_is_billed_until_the_deletion_request_not_the_grace_deadline() -> None:
    deleting = pod(
        metadata={"deletionTimestamp": "2024-05-01T10:01:00Z", "deletionGracePeriodSeconds": 30},
        status={"phase": "Running", "containerStatuses": [{"name": "main", "state": {"running": {}}}]},
    )
    assert billable_interval(deleting) == Interval(T_CREATED, T_CREATED + 30_000)


def test_a_deleted_pod_whose_containers_exited_before_the_request_is_billed_until_they_exited() -> None:
    deleting = pod(
        metadata={"deletionTimestamp": "2024-05-01T10:01:00Z", "deletionGracePeriodSeconds": 30},
        status={"phase": "Running", "containerStatuses": [terminated("2024-05-01T10:00:21Z")]},
    )
    assert billable_interval(deleting).end_ms == T_CREATED + 21_000


def test_the_grace_period_is_not_billed_even_when_the_containers_ran_through_part_of_it() -> None:
    # Windows that closed while the pod was terminating billed up to the request; so does the total.
    deleting = pod(
        metadata={"deletionTimestamp": "2024-05-01T10:01:00Z", "deletionGracePeriodSeconds": 30},
        status={"phase": "Running", "containerStatuses": [terminated("2024-05-01T10:00:41Z")]},
    )
    assert billable_interval(deleting).end_ms == T_CREATED + 30_000


def test_a_deleted_pod_the_kubelet_then_marks_failed_is_billed_until_the_request() -> None:
    # A real kubelet kills the container at the grace deadline and sets phase Failed: the terminal
    # phase must not move the end past the request a window may already have billed up to.
    killed = pod(
        metadata={"deletionTimestamp": "2024-05-01T10:00:32Z", "deletionGracePeriodSeconds": 2},
        status={"phase": "Failed", "containerStatuses": [terminated("2024-05-01T10:00:32Z")]},
    )
    assert billable_interval(killed).end_ms == T_CREATED + 30_000
    exited_first = pod(
        metadata={"deletionTimestamp": "2024-05-01T10:01:00Z", "deletionGracePeriodSeconds": 30},
        status={"phase": "Succeeded", "containerStatuses": [terminated("2024-05-01T10:00:21Z")]},
    )
    assert billable_interval(exited_first).end_ms == T_CREATED + 21_000


def test_the_first_deletion_request_wins_over_the_kubelets_final_grace_zero_delete() -> None:
    # The API server re-stamps deletionTimestamp to the time of the kubelet's grace-0 delete.
    first = pod(metadata={"deletionTimestamp": "2024-05-01T10:01:00Z", "deletionGracePeriodSeconds": 30})
    final = pod(metadata={"deletionTimestamp": "2024-05-01T10:00:31Z", "deletionGracePeriodSeconds": 0})
    requested_ms = deletion_requested_ms(first)
    assert requested_ms == T_CREATED + 30_000
    assert billable_interval(final).end_ms == T_CREATED + 31_000
    assert billable_interval(final, requested_ms).end_ms == T_CREATED + 30_000


def test_restarts_do_not_release_the_pods_resources() -> None:
    crashlooping = pod(
        status={
            "phase": "Running",
            "containerStatuses": [
                {"name": "main", "restartCount": 3, "lastState": {"terminated": {"finishedAt": CREATED}}}
            ],
        }
    )
    assert billable_interval(crashlooping).end_ms is None


def test_effective_request_is_max_of_init_containers_and_sum_of_app_containers() -> None:
    spec: dict[str, Any] = {
        "initContainers": [{"name": "fetch", "resources": {"requests": {"cpu": "3"}}}],
        "containers": [
            {"name": "a", "resources": {"requests": {"cpu": "1"}}},
            {"name": "b", "resources": {"requests": {"cpu": "500m"}}},
        ],
    }
    assert effective_quantity_milli(pod(spec=spec), "cpu") == 3000
    spec["initContainers"][0]["resources"]["requests"]["cpu"] = "1"
    assert effective_quantity_milli(pod(spec=spec), "cpu") == 1500


def test_sidecar_init_containers_add_to_every_later_step_and_to_the_app_containers() -> None:
    spec = {
        "initContainers": [
            {"name": "proxy", "restartPolicy": "Always", "resources": {"requests": {"memory": "1Gi"}}},
            {"name": "migrate", "resources": {"requests": {"memory": "2Gi"}}},
        ],
        "containers": [{"name": "app", "resources": {"requests": {"memory": "1Gi"}}}],
    }
    gib_milli = 2**30 * 1000
    # init step: proxy (1Gi) + migrate (2Gi) = 3Gi beats app (1Gi) + proxy (1Gi) = 2Gi
    assert effective_quantity_milli(pod(spec=spec), "memory") == 3 * gib_milli


def test_pod_overhead_is_added() -> None:
    spec = {
        "overhead": {"cpu": "250m"},
        "containers": [{"name": "a", "resources": {"requests": {"cpu": "1"}}}],
    }
    assert effective_quantity_milli(pod(spec=spec), "cpu") == 1250


def test_gpus_mig_slices_and_extended_resources_are_counted_by_name() -> None:
    spec = {
        "containers": [
            {
                "name": "a",
                "resources": {
                    "requests": {"nvidia.com/gpu": "2", "nvidia.com/mig-1g.10gb": "1"},
                    "limits": {"nvidia.com/gpu": "2", "nvidia.com/mig-1g.10gb": "1"},
                },
            },
            {"name": "b", "resources": {"limits": {"nvidia.com/gpu.shared": "1"}}},
        ]
    }
    assert effective_quantity_milli(pod(spec=spec), "nvidia.com/gpu") == 2000
    assert effective_quantity_milli(pod(spec=spec), "nvidia.com/mig-1g.10gb") == 1000
    assert effective_quantity_milli(pod(spec=spec), "nvidia.com/gpu.shared") == 1000
    assert effective_quantity_milli(pod(spec=spec), "example.com/fpga") == 0


def test_basis_limits_bills_limits_and_falls_back_to_requests_when_unbounded() -> None:
    spec = {
        "containers": [
            {"name": "a", "resources": {"requests": {"cpu": "1"}, "limits": {"cpu": "4"}}},
            {"name": "b", "resources": {"requests": {"cpu": "500m"}}},
        ]
    }
    assert effective_quantity_milli(pod(spec=spec), "cpu", "limits") == 4500
    assert effective_quantity_milli(pod(spec=spec), "cpu", "requests") == 1500


def test_pod_level_resources_override_the_container_sum() -> None:
    spec = {
        "resources": {"requests": {"cpu": "2"}},
        "containers": [{"name": "a", "resources": {"requests": {"cpu": "1"}}}],
    }
    assert effective_quantity_milli(pod(spec=spec), "cpu") == 2000
