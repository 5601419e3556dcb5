"""Test-suite wiring. With ``CI=true`` a skipped test fails the run: a skip hides a missing part."""

from __future__ import annotations

import pytest

from tests.support.ci import IN_CI

pytest_plugins = ["tests.plugins.cluster", "tests.plugins.prometheus"]

_skipped: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if IN_CI and _skipped:
        print(f"\nCI=true and {len(_skipped)} test(s) skipped; a skip in CI is a failure:")
        for nodeid in _skipped:
            print(f"  {nodeid}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
