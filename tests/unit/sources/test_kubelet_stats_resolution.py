"""The kubelet refreshes /stats/summary every 10-15 s (cAdvisor housekeeping) while the agent polls
every second: the long steps between the kubelet's samples are its resolution, not a gap; polls the
agent missed while a sample moved are."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from kubemeter.metering.windows import Window
from kubemeter.sources.kubelet import KubeletPoller, KubeletUsageSource, parse_summary

T0 = 1_700_000_010_000  # a multiple of the 30 s window
MiB = 2**20


def stamp(moment_ms: int) -> str:
    return datetime.fromtimestamp(moment_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def summary(time_ms: int, cpu_ns: int, working_set: int) -> dict[str, tuple[str, str, Any]]:
    pod = {
        "podRef": {"name": "p", "namespace": "n", "uid": "u"},
        "startTime": stamp(T0),
        "cpu": {"time": stamp(time_ms), "usageCoreNanoSeconds": cpu_ns},
        "memory": {"time": stamp(time_ms), "workingSetBytes": working_set},
    }
    return dict(parse_summary(json.dumps({"pods": [pod]})))


# The kubelet's samples (time, core-ns, bytes), 15 s apart as a real kubelet 1.36 serves them.
SAMPLES = [(T0, 0, 0), (T0 + 15_000, 3 * 10**9, 40 * MiB), (T0 + 30_000, 4 * 10**9, 8 * MiB)]


def poll_every_second(source: KubeletUsageSource, until_ms: int, skip: range = range(0)) -> None:
    for polled_ms in range(T0, until_ms + 1, 1000):
        if polled_ms - T0 in skip:
            continue  # the kubelet did not answer
        time_ms, cpu, working_set = max(s for s in SAMPLES if s[0] <= polled_ms)
        source.ingest(summary(time_ms, cpu, working_set), polled_ms)


def sources() -> tuple[KubeletUsageSource, KubeletUsageSource]:
    poller = KubeletPoller(1000, lambda: "", lambda: None)
    return (
        KubeletUsageSource("cpu", 30_000, 1000, T0, poller),
        KubeletUsageSource("memory", 30_000, 1000, T0, poller),
    )


def test_samples_fifteen_seconds_apart_polled_every_second_are_complete_and_exact() -> None:
    cpu, memory = sources()
    poll_every_second(cpu, T0 + 30_000)
    poll_every_second(memory, T0 + 30_000)
    (used,) = cpu.readings(Window(T0, T0 + 30_000), {})
    (held,) = memory.readings(Window(T0, T0 + 30_000), {})
    assert used.value == Decimal(4) and used.complete, used
    # 0 B for 15 s, then 40 MiB for 15 s: byte-seconds of the kubelet's own samples
    assert held.value == Decimal(40 * MiB * 15) and held.complete, held


def test_polls_missed_while_the_sample_moved_are_a_flagged_gap() -> None:
    cpu, memory = sources()
    missed = range(12_000, 20_000)  # no answer from 12 s to 19 s: the 15 s sample came in between
    poll_every_second(cpu, T0 + 30_000, missed)
    poll_every_second(memory, T0 + 30_000, missed)
    (used,) = cpu.readings(Window(T0, T0 + 30_000), {})
    (held,) = memory.readings(Window(T0, T0 + 30_000), {})
    assert used.value == Decimal(4) and not used.complete  # a counter loses nothing, but says so
    assert not held.complete and "memory not observed" in (held.incomplete_reason or "")


def test_a_counter_that_did_not_move_reads_zero_for_max_request_usage_not_no_data() -> None:
    poller = KubeletPoller(1000, lambda: "", lambda: None)
    plain = KubeletUsageSource("cpu", 30_000, 1000, T0, poller)
    for_max = KubeletUsageSource("cpu", 30_000, 1000, T0, poller, zero_readings=True)
    for source in (plain, for_max):
        for polled_ms in range(T0, T0 + 61_000, 1000):  # a sleeping pod, sampled every 15 s
            source.ingest(summary(T0 + (polled_ms - T0) // 15_000 * 15_000, 0, MiB), polled_ms)
    assert plain.readings(Window(T0 + 30_000, T0 + 60_000), {}) == []  # no event for nothing
    (idle,) = for_max.readings(Window(T0 + 30_000, T0 + 60_000), {})
    assert idle.value == 0 and idle.complete
