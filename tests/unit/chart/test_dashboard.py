"""dashboards/kubemeter.json queries only metrics the agent, gateway and operator really export."""

from __future__ import annotations

import json
import re

from testbed.controlplane import REPO_ROOT

DASHBOARD = REPO_ROOT / "dashboards" / "kubemeter.json"
METRIC = re.compile(r"\bkubemeter_[a-z_]+")
SUFFIXES = ("_bucket", "_sum", "_count", "_total")


def exported_names() -> set[str]:
    """Metric names as declared in the code (prometheus_client adds _total to counters itself)."""
    names: set[str] = set()
    for root in ("agents", "operator"):
        for path in (REPO_ROOT / root).rglob("*.py"):
            names |= set(re.findall(r'"(kubemeter_[a-z_]+)"', path.read_text()))
    return names


def base_name(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def test_every_queried_metric_exists() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    declared = exported_names()
    queried = {name for expr in exprs for name in METRIC.findall(expr)}
    missing = sorted(n for n in queried if n not in declared and base_name(n) not in declared)
    assert missing == [], f"the dashboard queries metrics no code exports: {missing}"


def test_every_agent_and_gateway_metric_has_a_panel() -> None:
    text = DASHBOARD.read_text()
    queried = {base_name(name) for name in METRIC.findall(text)}
    data_plane = {base_name(n) for n in exported_names() if not n.startswith("kubemeter_operator_")}
    assert data_plane - queried == set(), "add a panel for these metrics"


def test_panels_have_unique_ids_and_use_the_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
