"""What a test does when a part of its environment is missing: fail in CI, skip elsewhere."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> NoReturn:
    """A missing part of the test environment: a failure with ``CI=true``, a skip otherwise."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a test that cannot run fails)", pytrace=False)
    pytest.skip(reason)
