"""hostNetwork and the API server address as chart options: off by default; on, the operator and the
default Collector run in the node's network, bound to the node's address, and the operator (and through
it the agents) is told where the API server is. The values schema refuses a malformed address."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.chart.chart_tools import find, helm, render, set_args


@pytest.fixture(scope="module")
def helm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("helm")


def operator_pod(docs: list[dict[str, object]]) -> dict[str, object]:
    deployment = find(docs, "Deployment")
    pod: dict[str, object] = deployment["spec"]["template"]["spec"]  # type: ignore[index]
    return pod


def test_host_network_is_off_by_default(helm_home: Path) -> None:
    docs = render(helm_home, {"collector.enabled": True})
    pod = operator_pod(docs)
    assert "hostNetwork" not in pod
    assert "hostNetwork" not in find(docs, "Collector")["spec"]
    env = {item["name"] for item in pod["containers"][0]["env"]}  # type: ignore[index]
    assert not env & {"KUBERNETES_SERVICE_HOST", "KUBEMETER_POD_API_SERVER", "KUBEMETER_POD_IP"}


def test_host_network_binds_the_pod_address_and_reaches_the_collector(helm_home: Path) -> None:
    values = {"hostNetwork": True, "apiServerAddress": "127.0.0.1:36443", "collector.enabled": True}
    docs = render(helm_home, values)
    pod = operator_pod(docs)
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    container = pod["containers"][0]  # type: ignore[index]
    assert "--listen-host=$(KUBEMETER_POD_IP)" in container["args"]
    env = {item["name"]: item for item in container["env"]}
    assert env["KUBEMETER_POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["KUBERNETES_SERVICE_HOST"]["value"] == "127.0.0.1"
    assert env["KUBERNETES_SERVICE_PORT"]["value"] == "36443"
    assert env["KUBEMETER_POD_API_SERVER"]["value"] == "127.0.0.1:36443"
    assert find(docs, "Collector")["spec"]["hostNetwork"] is True


@pytest.mark.parametrize("address", ["127.0.0.1", "https://127.0.0.1:6443", "host:port"])
def test_a_malformed_api_server_address_is_refused(helm_home: Path, address: str) -> None:
    result = helm(
        "template",
        "t",
        str(Path(__file__).parents[3] / "charts" / "kubemeter"),
        *set_args({"apiServerAddress": address}),
        home=helm_home,
        check=False,
    )
    assert result.returncode != 0
    assert "apiServerAddress" in result.stderr, result.stderr
