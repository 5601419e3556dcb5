"""Run:ai through an emulator of its documented endpoints: pagination, a 401 mid-run, and a
5-minute outage that is back-filled. Time is simulated by windows, never slept through."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
from kubemeter.metering.windows import Window
from kubemeter.sources.runai import (
    RunaiAuthError,
    RunaiClient,
    RunaiCredentials,
    RunaiSource,
    RunaiUnavailableError,
    integrate,
)
from kubemeter.sources.runai.client import iso

from tests.support.runai_emulator import RunaiEmulator

T0_MS = 1_700_000_040_000  # a minute boundary
WINDOW_MS = 60_000
LAG_MS = 30_000


class Clock:
    def __init__(self) -> None:
        self.now_ms = T0_MS

    def ms(self) -> int:
        return self.now_ms

    def s(self) -> float:
        return self.now_ms / 1000


WORKLOADS = [
    {"id": "w-vision", "name": "resnet", "projectName": "vision", "departmentName": "research"},
    {"id": "w-nlp", "name": "bert", "projectName": "nlp", "departmentName": "product"},
    {"id": "w-other", "name": "far", "projectName": "ops", "departmentName": "infra"},
]


def pod(pod_id: str, workload: str, node: str, completed_ms: int | None = None) -> dict[str, Any]:
    return {
        "id": pod_id,
        "name": f"{pod_id}-0",
        "workloadId": workload,
        "nodeName": node,
        "projectName": next(w["projectName"] for w in WORKLOADS if w["id"] == workload),
        "createdAt": iso(T0_MS - 3_600_000),
        "completedAt": iso(completed_ms) if completed_ms else None,
    }


# Interleaved with other nodes' pods so a page holds both: pagination must not drift.
PODS = [
    pod("uid-1", "w-vision", "node-a"),
    pod("uid-3", "w-other", "node-b"),
    pod("uid-2", "w-nlp", "node-a"),
    pod("uid-5", "w-other", "node-b"),
    pod("uid-4", "w-vision", "node-a", completed_ms=T0_MS + 90_000),
]
GPUS = {"uid-1": "0.5", "uid-2": "1", "uid-3": "4", "uid-4": "2", "uid-5": "4"}


def gpu_allocation(pod: dict[str, Any], metric: str, time_ms: int) -> str | None:
    assert metric == "GPU_ALLOCATION"
    completed = pod.get("completedAt")
    if completed and time_ms > T0_MS + 90_000:
        return None  # no samples after the pod completed
    return GPUS[pod["id"]]


@pytest.fixture
async def runai() -> AsyncIterator[tuple[RunaiEmulator, Clock]]:
    clock = Clock()
    emulator = RunaiEmulator(WORKLOADS, PODS, gpu_allocation, clock.s, token_ttl_s=300)
    await emulator.start()
    yield emulator, clock
    await emulator.stop()


async def no_sleep(seconds: float) -> None:
    return None


def source_for(
    emulator: RunaiEmulator, clock: Clock, secret: str = "s3cret"
) -> tuple[RunaiSource, RunaiClient]:
    client = RunaiClient(
        emulator.url, RunaiCredentials("kubemeter", secret), page_size=2, clock_s=clock.s, sleep=no_sleep
    )
    source = RunaiSource(
        "GPU_ALLOCATION", "node-a", client, WINDOW_MS, T0_MS, lag_ms=LAG_MS, clock_ms=clock.ms
    )
    return source, client


def window(index: int) -> Window:
    return Window(T0_MS + index * WINDOW_MS, T0_MS + (index + 1) * WINDOW_MS)


def values(source: RunaiSource, index: int) -> dict[str, tuple[Decimal, bool]]:
    return {r.pod_uid: (r.value, r.complete) for r in source.readings(window(index), {})}


async def test_gpu_seconds_per_pod_of_this_node_with_project_and_department(
    runai: tuple[RunaiEmulator, Clock],
) -> None:
    emulator, clock = runai
    source, client = source_for(emulator, clock)
    clock.now_ms = window(1).end_ms + LAG_MS
    await source.poll()
    assert values(source, 0) == {
        "uid-1": (Decimal(30), True),  # 0.5 GPU x 60 s
        "uid-2": (Decimal(60), True),
        "uid-4": (Decimal(120), True),
    }
    assert values(source, 1) == {
        "uid-1": (Decimal(30), True),
        "uid-2": (Decimal(60), True),
        "uid-4": (Decimal(60), True),
    }
    first = source.readings(window(0), {})[0]
    assert first.dimensions == {"project": "vision", "department": "research", "workload": "resnet"}
    # 5 pods at 2 per page: 3 pages per listing, nothing read twice or skipped.
    assert emulator.requests.count("GET /api/v1/workloads/pods") == 2 * 3
    assert source.observed_through_ms() == window(1).end_ms
    await client.close()


async def test_a_revoked_token_mid_run_is_replaced_and_expiry_is_anticipated(
    runai: tuple[RunaiEmulator, Clock],
) -> None:
    emulator, clock = runai
    source, client = source_for(emulator, clock)
    clock.now_ms = window(0).end_ms + LAG_MS
    await source.poll()
    emulator.revoke_tokens()  # 401 on the next request
    clock.now_ms = window(1).end_ms + LAG_MS
    await source.poll()
    assert emulator.unauthorized == 1 and client.tokens_fetched == 2
    assert values(source, 1)["uid-1"] == (Decimal(30), True)

    # The 300 s token is refreshed a minute before it lapses, not after a 401.
    clock.now_ms = window(6).end_ms + LAG_MS
    await source.poll()
    assert emulator.unauthorized == 1 and client.tokens_fetched == 3
    await client.close()


async def test_a_five_minute_outage_is_back_filled_window_by_window(
    runai: tuple[RunaiEmulator, Clock],
) -> None:
    emulator, clock = runai
    source, client = source_for(emulator, clock)
    clock.now_ms = window(0).end_ms + LAG_MS
    await source.poll()

    emulator.outage = True
    for index in range(1, 6):  # five windows pass while Run:ai answers 503
        clock.now_ms = window(index).end_ms + LAG_MS
        with pytest.raises(RunaiUnavailableError):
            await source.poll()
    assert "Run:ai unavailable" in (source.fault() or "")
    assert source.observed_through_ms() == window(1).start_ms
    # Were the agent to close a window now, it would be flagged, never zero-filled as complete.
    assert all(not r.complete and r.incomplete_reason for r in source.readings(window(1), {}))

    emulator.outage = False
    await source.poll()
    assert source.fault() is None and source.observed_through_ms() == window(5).end_ms
    for index in range(1, 6):
        assert values(source, index)["uid-1"] == (Decimal(30), True), index
        assert values(source, index)["uid-2"] == (Decimal(60), True), index
    await client.close()


async def test_refused_credentials_fail_this_meter_alone(runai: tuple[RunaiEmulator, Clock]) -> None:
    emulator, clock = runai
    broken, broken_client = source_for(emulator, clock, secret="wrong")
    working, working_client = source_for(emulator, clock)
    clock.now_ms = window(0).end_ms + LAG_MS
    with pytest.raises(RunaiAuthError):
        await broken.poll()
    await working.poll()
    assert "credentials refused" in (broken.fault() or "") and "clientSecret" in (broken.fault() or "")
    assert values(working, 0)["uid-1"] == (Decimal(30), True)
    await broken_client.close()
    await working_client.close()


def test_missing_samples_are_a_gap_not_a_zero() -> None:
    samples = [(0, Decimal(1)), (15_000, Decimal(1)), (60_000, Decimal(1))]
    assert integrate(samples, 0, 60_000, max_step_ms=37_500) == (Decimal("52.5"), 7_500)
