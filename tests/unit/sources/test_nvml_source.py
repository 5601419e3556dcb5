"""NVML meters driven through a fake at the pynvml boundary with NVML's own semantics."""

from __future__ import annotations

import json
import logging
from decimal import Decimal
from pathlib import Path

import pytest
from kubemeter.metering.windows import Window
from kubemeter.sources.base import Reading
from kubemeter.sources.nvml import NvmlEdge, NvmlSource, NvmlUnavailableError
from kubemeter.sources.podresources import DeviceAssignment, PodResourcesUnavailableError

from tests.unit.sources.fake_pynvml import FakeGpu, FakeNvml

GiB = 2**30
WINDOW = Window(0, 60_000)
INTERVAL_MS = 5_000
UIDS = {"train-a": "aaaaaaaa-0000-4000-8000-000000000001", "infer-b": "bbbbbbbb-0000-4000-8000-000000000002"}


class Clock:
    def __init__(self) -> None:
        self.now_ms = 0

    def __call__(self) -> int:
        return self.now_ms


class FakePodResources:
    def __init__(self, *assignments: DeviceAssignment) -> None:
        self.assignments = list(assignments)
        self.down = False

    async def list_assignments(self) -> list[DeviceAssignment]:
        if self.down:
            raise PodResourcesUnavailableError("PodResources List failed: UNAVAILABLE")
        return self.assignments


def holds(pod: str, device_id: str, resource: str = "nvidia.com/gpu") -> DeviceAssignment:
    return DeviceAssignment("ml", pod, "main", resource, device_id)


def resolve(namespace: str, name: str) -> str | None:
    return UIDS.get(name)


@pytest.fixture
def proc_root(tmp_path: Path) -> Path:
    """Host /proc with pid 100 in train-a's cgroup (systemd, v2) and 200 in infer-b's (cgroupfs, v1)."""
    for pid, cgroup in {
        100: f"0::/kubepods.slice/kubepods-pod{UIDS['train-a'].replace('-', '_')}.slice/crio-1.scope\n",
        200: f"4:memory:/kubepods/burstable/pod{UIDS['infer-b']}/2\n",
        300: "0::/system.slice/some-host-daemon.service\n",
    }.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cgroup").write_text(cgroup)
    return tmp_path


def source_for(
    metric: str,
    gpus: list[FakeGpu],
    podresources: FakePodResources,
    proc_root: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[NvmlSource, FakeNvml, Clock]:
    fake = FakeNvml(gpus).install(monkeypatch)
    clock = Clock()
    edge = NvmlEdge(proc_root=proc_root, clock_ms=clock)
    source = NvmlSource(metric, 60_000, INTERVAL_MS, 0, edge, podresources, resolve, clock_ms=clock)  # type: ignore[arg-type]
    return source, fake, clock


def by_pod(readings: list[Reading]) -> dict[str, tuple[Decimal, bool, str | None, str]]:
    names = {uid: name for name, uid in UIDS.items()}
    return {
        names[r.pod_uid]: (r.value, r.complete, r.incomplete_reason, r.dimensions["attribution"])
        for r in readings
    }


async def test_an_exclusive_gpu_at_half_utilization_for_a_minute_is_thirty_gpu_seconds(
    proc_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu = FakeGpu("GPU-a", utilization_percent=50, processes=[(100, 3 * GiB)])
    source, _, clock = source_for(
        "utilization", [gpu], FakePodResources(holds("train-a", "GPU-a")), proc_root, monkeypatch
    )
    for clock.now_ms in range(0, 60_001, INTERVAL_MS):
        await source.poll()
    readings = source.readings(WINDOW, {})
    assert by_pod(readings) == {"train-a": (Decimal(30), True, None, "exclusive")}
    assert readings[0].part == "GPU-a"
    assert readings[0].dimensions == {
        "gpu": "GPU-a",
        "gpu_model": "NVIDIA H100 80GB HBM3",
        "attribution": "exclusive",
    }


async def test_energy_is_the_counter_delta_and_a_driver_reload_is_flagged_not_guessed(
    proc_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu = FakeGpu("GPU-a", energy_mj=55_491_669_881)
    source, fake, clock = source_for(
        "energy", [gpu], FakePodResources(holds("train-a", "GPU-a")), proc_root, monkeypatch
    )
    for clock.now_ms in range(0, 120_001, INTERVAL_MS):
        if clock.now_ms == 65_000:
            fake.reload_driver()  # at 62.5 s: the 750 J drawn from 60 s to 62.5 s are never seen
            gpu.energy_mj = 750_000
        elif clock.now_ms:
            gpu.energy_mj += 1_500_000  # 300 W for 5 s
        await source.poll()
    assert by_pod(source.readings(WINDOW, {})) == {"train-a": (Decimal(18_000), True, None, "exclusive")}
    ((value, complete, reason, _),) = by_pod(source.readings(Window(60_000, 120_000), {})).values()
    assert (value, complete) == (Decimal(17_250), False)
    assert reason is not None and "driver reload" in reason
    assert fake.init_calls == 2


async def test_a_time_sliced_gpu_is_split_by_each_pods_process_samples_without_double_counting(
    proc_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu = FakeGpu("GPU-s", utilization_percent=80)
    pods = FakePodResources(holds("train-a", "GPU-s::0"), holds("infer-b", "GPU-s::1"))
    source, _, clock = source_for("utilization", [gpu], pods, proc_root, monkeypatch)
    for clock.now_ms in range(0, 60_001, INTERVAL_MS):
        if 0 < clock.now_ms <= 30_000:
            gpu.samples += [(100, clock.now_ms * 1000 - 1, 60), (200, clock.now_ms * 1000 - 1, 20)]
        elif clock.now_ms > 30_000:
            # train-a went idle: NVML has no new sample for it. Re-reading the old ones (a lost
            # lastSeenTimeStamp cursor) would keep giving it a share.
            gpu.samples.append((200, clock.now_ms * 1000 - 1, 80))
        await source.poll()
    assert by_pod(source.readings(WINDOW, {})) == {
        "train-a": (Decimal(18), True, None, "process-share"),  # 80 % x 3/4 x 30 s
        "infer-b": (Decimal(30), True, None, "process-share"),  # 80 % x 1/4 x 30 s + 80 % x 30 s
    }


async def test_an_idle_shared_gpu_answers_not_found_and_is_billed_zero_not_missing(
    proc_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu = FakeGpu("GPU-s", utilization_percent=0)
    pods = FakePodResources(holds("train-a", "GPU-s::0"), holds("infer-b", "GPU-s::1"))
    source, _, clock = source_for("utilization", [gpu], pods, proc_root, monkeypatch)
    for clock.now_ms in range(0, 60_001, INTERVAL_MS):
        await source.poll()
    assert by_pod(source.readings(WINDOW, {})) == {
        "train-a": (Decimal(0), True, None, "process-share"),
        "infer-b": (Decimal(0), True, None, "process-share"),
    }


async def test_shared_gpu_memory_is_each_pods_own_process_memory(
    proc_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu = FakeGpu("GPU-s", memory_used_bytes=4 * GiB, processes=[(100, 2 * GiB), (200, GiB), (300, GiB)])
    pods = FakePodResources(holds("train-a", "GPU-s::0"), holds("infer-b", "GPU-s::1"))
    source, _, clock = source_for("memoryUsed", [gpu], pods, proc_root, monkeypatch)
    for clock.now_ms in range(0, 60_001, INTERVAL_MS):
        await source.poll()
    assert by_pod(source.readings(WINDOW, {})) == {
        "train-a": (Decimal(2 * GiB * 60), True, None, "process-share"),
        "infer-b": (Decimal(GiB * 60), True, None, "process-share"),
    }


def mig_gpu() -> FakeGpu:
    return FakeGpu(
        "GPU-m",
        energy_mj=0,
        mig=[
            FakeGpu(
                "MIG-1", memory_total_bytes=10 * GiB, memory_used_bytes=4 * GiB, processes=[(100, 4 * GiB)]
            ),
            FakeGpu(
                "MIG-2", memory_total_bytes=30 * GiB, memory_used_bytes=6 * GiB, processes=[(200, 6 * GiB)]
            ),
        ],
    )


def mig_pods() -> FakePodResources:
    return FakePodResources(
        holds("train-a", "MIG-1", "nvidia.com/mig-1g.10gb"),
        holds("infer-b", "MIG-2", "nvidia.com/mig-3g.30gb"),
    )


async def test_mig_instances_share_the_parent_energy_by_slice_and_own_their_memory(
    proc_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    energy, _, clock = source_for("energy", [gpu := mig_gpu()], mig_pods(), proc_root, monkeypatch)
    for clock.now_ms in range(0, 60_001, INTERVAL_MS):
        gpu.energy_mj = 400 * clock.now_ms  # 400 W
        await energy.poll()
    assert by_pod(energy.readings(WINDOW, {})) == {
        "train-a": (Decimal(6_000), True, None, "mig-slice-share"),
        "infer-b": (Decimal(18_000), True, None, "mig-slice-share"),
    }

    memory, _, clock = source_for("memoryUsed", [mig_gpu()], mig_pods(), proc_root, monkeypatch)
    for clock.now_ms in range(0, 60_001, INTERVAL_MS):
        await memory.poll()
    assert by_pod(memory.readings(WINDOW, {})) == {
        "train-a": (Decimal(4 * GiB * 60), True, None, "exclusive"),
        "infer-b": (Decimal(6 * GiB * 60), True, None, "exclusive"),
    }


async def test_mig_utilization_is_flagged_incomplete_because_nvml_has_none(
    proc_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, _, clock = source_for("utilization", [mig_gpu()], mig_pods(), proc_root, monkeypatch)
    for clock.now_ms in range(0, 60_001, INTERVAL_MS):
        await source.poll()
    for _, complete, reason, _ in by_pod(source.readings(WINDOW, {})).values():
        assert not complete and reason is not None and "MIG" in reason


async def test_a_node_without_gpus_or_driver_is_quiet_and_a_gpu_pod_there_is_flagged_once(
    proc_root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pods = FakePodResources()
    source, fake, clock = source_for("energy", [], pods, proc_root, monkeypatch)
    fake.driver_loaded = False
    await source.poll()
    assert source.fault() is None and fake.init_calls == 0

    pods.assignments = [holds("train-a", "GPU-a")]
    caplog.set_level(logging.WARNING)
    for clock.now_ms in range(5_000, 60_001, INTERVAL_MS):
        with pytest.raises(NvmlUnavailableError):
            await source.poll()
    fault = source.fault()
    assert fault is not None and "NVIDIA_VISIBLE_DEVICES=all" in fault
    assert len([r for r in caplog.records if "nvml unavailable" in r.getMessage()]) == 1
    ((value, complete, reason, _),) = by_pod(source.readings(WINDOW, {})).values()
    assert (value, complete) == (Decimal(0), False)
    assert reason is not None and "NVML not read since" in reason


async def test_one_faulted_gpu_does_not_hide_the_others(
    proc_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = FakeGpu("GPU-a", utilization_percent=100)
    bad = FakeGpu("GPU-b", utilization_percent=100)
    pods = FakePodResources(holds("train-a", "GPU-a"), holds("infer-b", "GPU-b"))
    source, _, clock = source_for("utilization", [good, bad], pods, proc_root, monkeypatch)
    for clock.now_ms in range(0, 60_001, INTERVAL_MS):
        bad.broken = clock.now_ms >= 30_000
        await source.poll()
    readings = by_pod(source.readings(WINDOW, {}))
    assert readings["train-a"] == (Decimal(60), True, None, "exclusive")
    value, complete, reason, _ = readings["infer-b"]
    # Read until 25 s; the step that ended in the failed read at 30 s is not known, so it is flagged.
    assert (value, complete) == (Decimal(25), False)
    assert reason is not None and "GPU-b" in reason


async def test_podresources_down_is_a_fault_with_the_reason(
    proc_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pods = FakePodResources(holds("train-a", "GPU-a"))
    source, _, clock = source_for(
        "utilization", [FakeGpu("GPU-a", utilization_percent=10)], pods, proc_root, monkeypatch
    )
    await source.poll()
    pods.down = True
    clock.now_ms = 5_000
    with pytest.raises(PodResourcesUnavailableError):
        await source.poll()
    assert "podresources unavailable" in (source.fault() or "")


async def test_state_survives_a_restart_exactly(proc_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu = FakeGpu("GPU-a", utilization_percent=50)
    pods = FakePodResources(holds("train-a", "GPU-a"))
    first, _, clock = source_for("utilization", [gpu], pods, proc_root, monkeypatch)
    for clock.now_ms in range(0, 30_001, INTERVAL_MS):
        await first.poll()
    saved = first.snapshot()
    second, _, clock = source_for("utilization", [gpu], pods, proc_root, monkeypatch)
    second.restore(saved)
    for clock.now_ms in range(30_000, 60_001, INTERVAL_MS):
        await second.poll()
    assert by_pod(second.readings(WINDOW, {}))["train-a"][:2] == (Decimal(30), True)


async def test_a_gpu_held_across_an_agent_restart_is_billed_for_the_downtime_too(
    proc_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu = FakeGpu("GPU-a", energy_mj=0)
    pods = FakePodResources(holds("train-a", "GPU-a"))
    first, _, clock = source_for("energy", [gpu], pods, proc_root, monkeypatch)
    for clock.now_ms in range(0, 30_001, INTERVAL_MS):
        gpu.energy_mj = 300 * clock.now_ms  # 300 W
        await first.poll()
    saved = json.loads(json.dumps(first.snapshot()))
    second, _, clock = source_for("energy", [gpu], pods, proc_root, monkeypatch)
    second.restore(saved)
    for clock.now_ms in range(40_000, 60_001, INTERVAL_MS):  # the agent was down from 30 s to 40 s
        gpu.energy_mj = 300 * clock.now_ms
        await second.poll()
    # The counter covers the downtime, and the pod held the GPU throughout: 300 W x 60 s, exact.
    assert by_pod(second.readings(WINDOW, {}))["train-a"] == (Decimal(18_000), True, None, "exclusive")
