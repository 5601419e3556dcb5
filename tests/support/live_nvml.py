"""The NVML fake (``tests/unit/sources/fake_pynvml.py``) for a whole agent process, on real time.

``KUBEMETER_TEST_FAKE_NVML=<file.json>`` makes the agent harness install it before the agent starts.
The file lists GPUs as :class:`FakeGpu` fields plus ``busy`` (pid → SM-utilization percent): every
``nvmlDeviceGetProcessUtilization`` call then returns one fresh sample per busy process, newer than
the caller's cursor, as a GPU whose processes are steadily busy does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pynvml

from tests.unit.sources.fake_pynvml import FakeGpu, FakeNvml, Handle, nvml_error


class LiveFakeNvml(FakeNvml):
    def __init__(self, gpus: list[FakeGpu], busy: dict[str, dict[int, int]]) -> None:
        super().__init__(gpus)
        self.busy = busy  # gpu uuid → pid → SM %

    def nvmlDeviceGetProcessUtilization(self, handle: Handle, last_seen_us: int) -> list[Any]:
        self._check(handle)
        if handle.parent is not None:
            raise nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)
        busy = self.busy.get(handle.gpu.uuid) or {}
        if not busy:
            raise nvml_error(pynvml.NVML_ERROR_NOT_FOUND)
        stamp_us = max(last_seen_us + 1, time.time_ns() // 1000)
        return [
            type("Sample", (), {"pid": pid, "timeStamp": stamp_us, "smUtil": sm, "memUtil": 0})()
            for pid, sm in sorted(busy.items())
        ]

    def install_globally(self) -> None:
        for name in dir(self):
            if name.startswith("nvml"):
                setattr(pynvml, name, getattr(self, name))


def write_description(path: Path, gpus: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps(gpus))


def install_from_file(path: str) -> LiveFakeNvml:
    described = json.loads(Path(path).read_text())
    gpus, busy = [], {}
    for gpu in described:
        busy[gpu["uuid"]] = {int(pid): int(sm) for pid, sm in (gpu.pop("busy", None) or {}).items()}
        gpu["processes"] = [tuple(p) for p in gpu.get("processes", [])]
        gpus.append(FakeGpu(**gpu))
    fake = LiveFakeNvml(gpus, busy)
    fake.install_globally()
    return fake
