"""The chart lints, renders valid manifests (Kubernetes and our CRDs, offline), ships the CRDs as
generated, grants the operator exactly what it uses, and runs under Pod Security "restricted"."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubemeter_operator.builders.rbac import (
    agent_cluster_role_rules,
    operator_cluster_role_rules,
    operator_cluster_scoped_rules,
    operator_namespaced_rules,
)
from kubemeter_operator.main import PEERING_NAME

from tests.unit.chart.chart_tools import (
    CHART_DIR,
    CRD_DIR,
    find,
    helm,
    kubeconform,
    render,
    render_text,
    write_crd_schemas,
    write_kubernetes_schemas,
)

EVERYTHING_ON: dict[str, Any] = {
    "operator.replicas": 2,
    "collector.enabled": True,
    "collector.spec": {
        "output": {"type": "openmeter", "url": "http://sink.billing:8090"},
        "buffer": {"size": "2Gi", "whenFull": "Block"},
        "gateway": {"replicas": 2},
    },
    "networkPolicy.enabled": True,
    "networkPolicy.apiServerCIDRs": ["10.0.0.1/32"],
    "metrics.serviceMonitor.enabled": True,
    "hostNetwork": True,
    "apiServerAddress": "127.0.0.1:36443",
}


@pytest.fixture(scope="module")
def helm_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("helm")


@pytest.fixture(scope="module")
def schemas(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("schemas")
    return write_kubernetes_schemas(root / "kubernetes"), write_crd_schemas(root / "crds")


def test_chart_crds_are_the_generated_crds_byte_for_byte() -> None:
    generated = {path.name: path.read_bytes() for path in CRD_DIR.glob("*.yaml")}
    shipped = {path.name: path.read_bytes() for path in (CHART_DIR / "crds").glob("*.yaml")}
    assert sorted(shipped) == sorted(generated), "charts/kubemeter/crds must list exactly crds/*.yaml"
    for name, content in generated.items():
        assert shipped[name] == content, (
            f"charts/kubemeter/crds/{name} is stale; run cp crds/*.yaml charts/kubemeter/crds/"
        )


@pytest.mark.parametrize("values", [{}, EVERYTHING_ON], ids=["defaults", "everything-on"])
def test_helm_lint_strict_passes(helm_home: Path, values: dict[str, Any]) -> None:
    args = [arg for key, value in values.items() for arg in ("--set-json", f"{key}={json.dumps(value)}")]
    result = helm("lint", "--strict", str(CHART_DIR), *args, home=helm_home, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", [{}, EVERYTHING_ON], ids=["defaults", "everything-on"])
def test_rendered_manifests_match_the_kubernetes_and_crd_schemas(
    helm_home: Path, schemas: tuple[Path, Path], values: dict[str, Any]
) -> None:
    manifests = render_text(helm_home, values, "--include-crds")
    # ServiceMonitor/PodMonitor belong to the Prometheus Operator, whose CRDs we do not ship.
    result = kubeconform(manifests, *schemas, "-skip", "ServiceMonitor,PodMonitor")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)["summary"]
    kinds = {doc["kind"] for doc in yaml.safe_load_all(manifests) if doc}
    skipped = len(kinds & {"ServiceMonitor", "PodMonitor"})
    assert summary["invalid"] == 0 and summary["errors"] == 0, result.stdout
    assert summary["valid"] >= 6 and summary["skipped"] == skipped, summary


def test_kubeconform_finds_errors_with_these_schemas(helm_home: Path, schemas: tuple[Path, Path]) -> None:
    """The schemas really load (a broken $ref would show as 'could not find schema', not as valid)."""
    docs = render(helm_home, {"collector.enabled": True})
    deployment = find(docs, "Deployment")
    deployment["spec"]["replicas"] = "two"
    collector = find(docs, "Collector")
    collector["spec"]["output"]["type"] = "carrier-pigeon"
    collector["spec"]["unknownField"] = 1
    result = kubeconform(yaml.safe_dump_all([deployment, collector]), *schemas)
    assert result.returncode != 0
    assert "/spec/replicas" in result.stdout and "/spec/output/type" in result.stdout, result.stdout
    assert "unknownField" in result.stdout, result.stdout


def test_values_schema_refuses_a_misspelt_key(helm_home: Path) -> None:
    result = helm(
        "template", "km", str(CHART_DIR), "--set", "operator.replica=2", home=helm_home, check=False
    )
    assert result.returncode != 0 and "replica" in result.stderr


def test_two_replicas_without_peering_are_refused(helm_home: Path) -> None:
    result = helm(
        "template",
        "km",
        str(CHART_DIR),
        "--set",
        "operator.replicas=2",
        "--set",
        "operator.peering.enabled=false",
        home=helm_home,
        check=False,
    )
    assert result.returncode != 0 and "peering" in result.stderr


def _normalized(rules: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted(
        (
            tuple(sorted(rule.get("apiGroups", []))),
            tuple(sorted(rule.get("resources", []))),
            tuple(sorted(rule.get("resourceNames", []))),
            tuple(sorted(rule.get("verbs", []))),
        )
        for rule in rules
    )


def test_operator_cluster_roles_are_exactly_what_the_operator_uses(helm_home: Path) -> None:
    docs = render(helm_home)
    cluster = find(docs, "ClusterRole", "km-kubemeter-operator")
    assert _normalized(cluster["rules"]) == _normalized(operator_cluster_scoped_rules()), (
        "the chart's ClusterRole differs from operator_cluster_scoped_rules(); update "
        "charts/kubemeter/templates/clusterrole.yaml"
    )
    namespaced = find(docs, "ClusterRole", "km-kubemeter-operator-namespaced")
    assert _normalized(namespaced["rules"]) == _normalized(operator_namespaced_rules())


def test_watched_namespaces_confine_the_namespaced_rights_to_role_bindings(helm_home: Path) -> None:
    everywhere = render(helm_home)
    bound = {d["roleRef"]["name"] for d in everywhere if d["kind"] == "ClusterRoleBinding"}
    assert bound == {"km-kubemeter-operator", "km-kubemeter-operator-namespaced"}
    assert not [d for d in everywhere if d["kind"] == "RoleBinding"]
    confined = render(helm_home, {"operator.watchNamespaces": ["billing", "ml"]})
    bound = {d["roleRef"]["name"] for d in confined if d["kind"] == "ClusterRoleBinding"}
    assert bound == {"km-kubemeter-operator"}, "no namespaced right cluster-wide"
    role_bindings = [d for d in confined if d["kind"] == "RoleBinding"]
    assert sorted(d["metadata"]["namespace"] for d in role_bindings) == ["billing", "ml"]
    assert {d["roleRef"]["name"] for d in role_bindings} == {"km-kubemeter-operator-namespaced"}
    args = find(confined, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [a for a in args if a.startswith("--namespace")] == ["--namespace=billing", "--namespace=ml"]
    cluster_wide = {
        (resource, verb)
        for rule in find(confined, "ClusterRole", "km-kubemeter-operator")["rules"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    for right in (
        ("secrets", "get"),
        ("daemonsets", "create"),
        ("statefulsets", "patch"),
        ("meters", "list"),
    ):
        assert right not in cluster_wide, right


def _atoms(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        if not rule.get("resourceNames")
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_the_operator_holds_every_permission_of_the_agent_cluster_role_it_writes() -> None:
    # RBAC refuses to create or patch a ClusterRole granting more than its writer holds.
    missing = _atoms(agent_cluster_role_rules()) - _atoms(operator_cluster_role_rules())
    assert not missing, f"the operator could not write kubemeter-agent: it lacks {sorted(missing)}"


def test_operator_role_has_no_wildcards_and_no_secret_listing(helm_home: Path) -> None:
    docs = render(helm_home)
    rules = [rule for d in docs if d["kind"] == "ClusterRole" for rule in d["rules"]]
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], rule
        assert not {"escalate", "impersonate"} & set(rule["verbs"]), rule
    secret_verbs = {verb for rule in rules if "secrets" in rule["resources"] for verb in rule["verbs"]}
    assert secret_verbs == {"get", "create"}  # create: the generated ingest token, never an update
    # ClusterRoles: read and patch only kubemeter-agent, by name (create cannot be named)
    named = [rule for rule in rules if "clusterroles" in rule["resources"] and rule.get("resourceNames")]
    assert [(r["resourceNames"], sorted(r["verbs"])) for r in named] == [
        (["kubemeter-agent"], ["bind", "get", "patch"])
    ]
    unnamed = {
        v
        for r in rules
        if "clusterroles" in r["resources"] and not r.get("resourceNames")
        for v in r["verbs"]
    }
    assert unnamed == {"create"}


def test_the_gateway_network_policy_admits_agents_and_the_operator_only(helm_home: Path) -> None:
    from kubemeter_operator.builders.common import CollectorRef, labels

    policy = find(render(helm_home), "NetworkPolicy", "km-kubemeter-gateway")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    ref = CollectorRef("km", "default", "uid")
    gateway, agent = labels(ref, "gateway"), labels(ref, "agent")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= gateway.items()
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]  # the gateway container's port name
    peers = [peer["podSelector"]["matchLabels"] for peer in rule["from"]]
    assert peers[0].items() <= agent.items()
    assert peers[1]["app.kubernetes.io/component"] == "operator"
    assert len(peers) == 2, "nothing else, unless gatewayNetworkPolicy.ingressFrom adds it"
    extra = {"namespaceSelector": {"matchLabels": {"team": "apps"}}}
    opened = find(
        render(helm_home, {"gatewayNetworkPolicy.ingressFrom": [extra]}),
        "NetworkPolicy",
        "km-kubemeter-gateway",
    )
    assert opened["spec"]["ingress"][0]["from"][2] == extra
    assert not [
        d for d in render(helm_home, {"gatewayNetworkPolicy.enabled": False}) if d["kind"] == "NetworkPolicy"
    ]


def test_peering_object_matches_the_operator_and_two_replicas_are_peers(helm_home: Path) -> None:
    docs = render(helm_home, {"operator.replicas": 2})
    assert find(docs, "ClusterKopfPeering")["metadata"]["name"] == PEERING_NAME
    deployment = find(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "operator" and "--standalone" not in args
    assert find(docs, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1


def test_without_peering_the_operator_runs_standalone(helm_home: Path) -> None:
    docs = render(helm_home, {"operator.peering.enabled": False})
    assert not [d for d in docs if d["kind"] == "ClusterKopfPeering"]
    assert "--standalone" in find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]


def test_operator_pod_meets_the_restricted_pod_security_level(helm_home: Path) -> None:
    pod = find(render(helm_home), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not {"hostPID", "hostNetwork", "hostIPC"} & set(pod)
    assert all("hostPath" not in volume for volume in pod.get("volumes", []))
    for container in pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["readOnlyRootFilesystem"] is True


def test_agents_and_gateways_get_the_operator_image_and_cluster_name(helm_home: Path) -> None:
    docs = render(helm_home, {"image.tag": "1.2.3", "clusterName": "eu-prod"})
    container = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert container["image"] == "ghcr.io/kubemeter/kubemeter:1.2.3"
    assert env["KUBEMETER_IMAGE"] == container["image"]
    assert env["KUBEMETER_CLUSTER_NAME"] == "eu-prod"


def test_default_collector_is_rendered_only_when_enabled(helm_home: Path) -> None:
    assert not [d for d in render(helm_home) if d["kind"] == "Collector"]
    docs = render(helm_home, {"collector.enabled": True, "collector.name": "main"})
    collector = find(docs, "Collector", "main")
    assert collector["metadata"]["namespace"] == "kubemeter-system"
    assert collector["spec"]["output"]["type"] == "openmeter"


def test_optional_monitoring_and_network_policy(helm_home: Path) -> None:
    plain = {d["kind"] for d in render(helm_home, {"gatewayNetworkPolicy.enabled": False})}
    assert not plain & {"ServiceMonitor", "PodMonitor", "NetworkPolicy"}
    docs = render(helm_home, EVERYTHING_ON)
    assert find(docs, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "metrics"
    ports = {e["port"] for e in find(docs, "PodMonitor")["spec"]["podMetricsEndpoints"]}
    assert ports == {"metrics", "http"}  # agent and gateway port names in the operator's builders
    policy = find(docs, "NetworkPolicy", "km-kubemeter-operator")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    # the operator reads gateways' /status and agents' /healthz: both must be reachable
    reached = {
        (rule["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"], rule["ports"][0]["port"])
        for rule in policy["spec"]["egress"]
        if rule.get("to") and "podSelector" in rule["to"][0]
    }
    assert reached == {("gateway", 8480), ("agent", "metrics")}
