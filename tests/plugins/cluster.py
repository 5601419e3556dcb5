"""pytest plugin: the real local control plane (see :mod:`testbed.controlplane`).

Fixtures: ``cluster`` (session-wide :class:`ControlPlane`), ``namespace`` (a fresh namespace per
test, deleted afterwards), ``real_node`` (session-wide :class:`~testbed.realnode.RealNode` ``real-0``
joined to ``cluster``: containerd, runc and a kubelet running real containers; started by the first
test that asks for it, so the kwok-only tests before it see the five kwok nodes alone). With
``CI=true`` a control plane or node that cannot start fails the tests that need it; elsewhere they are
skipped with the reason.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from testbed.controlplane import ControlPlane, ControlPlaneError, missing_binaries, tools_bin_dir
from testbed.realnode import RealNode, unavailable_reason
from tests.support.ci import unavailable

_planes: list[ControlPlane] = []
_nodes: list[RealNode] = []


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    bin_dir = tools_bin_dir()
    missing = missing_binaries(bin_dir)
    if missing:
        unavailable(f"control-plane binaries missing in {bin_dir}: {', '.join(missing)}; run tools/build.sh")
    plane = ControlPlane(tmp_path_factory.mktemp("cluster"), bin_dir=bin_dir)
    _planes.append(plane)
    try:
        plane.start()
    except ControlPlaneError as error:
        unavailable(f"the local control plane did not start: {error}")
    try:
        yield plane
    finally:
        plane.stop()
        _planes.remove(plane)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the real node run last, in their own order: once started, real-0 stays joined to
    the session's cluster, and the tests before it count the kwok nodes (DaemonSet desired, the
    scheduler's choices)."""
    on_real_node = [item for item in items if "real_node" in getattr(item, "fixturenames", ())]
    if on_real_node:
        items[:] = [item for item in items if item not in on_real_node] + on_real_node


@pytest.fixture(scope="session")
def real_node(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealNode]:
    reason = unavailable_reason(cluster.bin_dir)
    if reason:
        unavailable(reason)
    node = RealNode(cluster, tmp_path_factory.mktemp("real-node"), bin_dir=cluster.bin_dir)
    _nodes.append(node)
    try:
        node.start()
    except ControlPlaneError as error:
        _nodes.remove(node)
        unavailable(f"the real node did not start: {error}")
    try:
        yield node
    finally:
        node.stop()
        _nodes.remove(node)
    if node.leftovers_after_stop:
        pytest.fail(f"the real node left behind: {node.leftovers_after_stop}", pytrace=False)


@pytest.fixture
def namespace(cluster: ControlPlane) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and _planes and "cluster" in getattr(item, "fixturenames", ()):
        plane = _planes[-1]
        report.sections.append(("control plane logs", plane.logs_report()))
        report.sections.append(("control plane memory (RSS bytes)", json.dumps(plane.rss_bytes())))
    if report.failed and _nodes and "real_node" in getattr(item, "fixturenames", ()):
        node = _nodes[-1]
        report.sections.append(("real node logs", node.logs_report()))
        report.sections.append(("real node memory (RSS bytes)", json.dumps(node.rss_bytes())))
