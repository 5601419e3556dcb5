"""The real-NVML suite (``make test-gpu`` / ``pytest -m gpu``). No GPU is a failure here, never a
skip: this suite exists to prove the real path on a GPU machine."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/gpu/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
