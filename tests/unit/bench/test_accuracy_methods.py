"""The anchors' methods in the accuracy benchmark behave as their notes describe, on exact examples."""

from __future__ import annotations

from bench.accuracy import (
    TRACE_START_MS,
    TracePod,
    compare,
    ground_truth,
    kubemeter,
    opencost,
    openmeter_snapshot,
)

GPU_SECOND = 1000 * 1000  # milli-GPU x milliseconds


def _pod(start_s: int, end_s: int, quantity: str = "1") -> TracePod:
    return TracePod(
        "u", "nvidia.com/gpu", quantity, TRACE_START_MS + start_s * 1000, TRACE_START_MS + end_s * 1000
    )


def test_seven_second_job_is_billed_seven_gpu_seconds_by_kubemeter() -> None:
    pod = _pod(5, 12)
    assert kubemeter(pod) == ground_truth(pod) == 7 * GPU_SECOND


def test_snapshot_sampler_misses_a_job_between_ticks_and_charges_a_seen_one_a_whole_tick() -> None:
    assert openmeter_snapshot(_pod(5, 12)) == 0
    assert openmeter_snapshot(_pod(25, 32)) == 30 * GPU_SECOND


def test_opencost_minutes_are_last_minus_first_sample_or_one_resolution() -> None:
    assert opencost(_pod(5, 12), 60_000) == 0
    assert opencost(_pod(55, 70), 60_000) == 60 * GPU_SECOND
    assert opencost(_pod(30, 200), 60_000) == 120 * GPU_SECOND  # samples at 60, 120 and 180 s


def test_a_pod_spanning_windows_is_split_without_losing_a_millisecond() -> None:
    pod = _pod(59, 3661, quantity="8")
    assert kubemeter(pod) == 8 * 3602 * GPU_SECOND


def test_comparison_reports_kubemeter_exact_and_samplers_missing_short_jobs() -> None:
    pods = [_pod(5, 12), _pod(100, 4000), _pod(4100, 4110)]
    figures = {f["name"]: f["value"] for f in compare(pods)}
    assert figures["accuracy/kubemeter/all/total-error"] == 0.0
    assert figures["accuracy/kubemeter/under-60s/pods-missed"] == 0
    assert figures["accuracy/openmeter-snapshot-30s/under-60s/pods-missed"] == 2  # both fall between ticks
