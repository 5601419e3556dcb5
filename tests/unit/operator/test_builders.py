"""Pure builders: every child is owned by its Collector, labelled, and configured from the spec."""

from __future__ import annotations

from typing import Any

import yaml
from kubemeter.api.collector import CollectorSpec
from kubemeter.api.meter import MeterSpec
from kubemeter.api.rendered import AgentConfig, GatewayConfig, ResolvedMeter
from kubemeter_operator.builders import build_children
from kubemeter_operator.builders.common import COLLECTOR_LABEL, CollectorRef
from kubemeter_operator.builders.rbac import AGENT_CLUSTER_ROLE, get_agent_cluster_role
from kubemeter_operator.settings import OperatorSettings

REF = CollectorRef(namespace="billing", name="chargeback", uid="uid-1")
SETTINGS = OperatorSettings(cluster_name="prod", image="kubemeter:test")
SPEC = CollectorSpec.model_validate(
    {
        "nodeSelector": {"gpu": "true"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "output": {
            "type": "openmeter",
            "url": "http://om:8888",
            "credentialsSecretRef": {"name": "om-token", "key": "token"},
        },
        "buffer": {"size": "10Gi", "storageClassName": "fast", "onDelete": "Drain"},
        "gateway": {"replicas": 2},
    }
)
METER = ResolvedMeter(
    name="gpu",
    namespace="billing",
    uid="meter-uid",
    pipeline="compute",
    spec=MeterSpec.model_validate(
        {
            "eventType": "gpu-seconds",
            "unit": "gpu-seconds",
            "source": {"allocation": {"resource": "nvidia.com/gpu"}},
        }
    ),
)


def children() -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (child["kind"], child["metadata"]["name"]): child
        for child in build_children(REF, SPEC, [METER], SETTINGS)
    }


def test_the_collector_owns_every_namespaced_child() -> None:
    built = children()
    assert sorted(built) == [
        ("ClusterRoleBinding", "kubemeter-agent-billing-chargeback"),
        ("ConfigMap", "chargeback-config"),
        ("DaemonSet", "chargeback-agent"),
        ("PodDisruptionBudget", "chargeback-gateway"),
        ("Service", "chargeback-gateway"),
        ("Service", "chargeback-gateway-headless"),
        ("ServiceAccount", "chargeback-agent"),
        ("ServiceAccount", "chargeback-gateway"),
        ("StatefulSet", "chargeback-gateway"),
    ]
    for (kind, _), child in built.items():
        meta = child["metadata"]
        assert meta["labels"][COLLECTOR_LABEL] == "chargeback"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kubemeter-operator"
        if kind == "ClusterRoleBinding":
            assert "ownerReferences" not in meta  # cluster-scoped: deleted by the operator
            assert meta["labels"]["kubemeter.io/collector-namespace"] == "billing"
        else:
            assert meta["namespace"] == "billing"
            assert meta["ownerReferences"] == [
                {
                    "apiVersion": "kubemeter.io/v1alpha1",
                    "kind": "Collector",
                    "name": "chargeback",
                    "uid": "uid-1",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ]


def test_config_map_holds_the_resolved_agent_and_gateway_config() -> None:
    data = children()[("ConfigMap", "chargeback-config")]["data"]
    agent = AgentConfig.from_yaml(data["agent.yaml"])
    assert agent.cluster == "prod" and agent.collector == "chargeback" and agent.namespace == "billing"
    assert agent.gateway_url == "http://chargeback-gateway.billing.svc:8480"
    assert [meter.name for meter in agent.meters] == ["gpu"]
    assert agent.meters[0].uid == "meter-uid"
    gateway = GatewayConfig.from_yaml(data["gateway.yaml"])
    assert gateway.credentials_file == "/etc/kubemeter/secrets/om-token/token"
    assert gateway.buffer_max_bytes == int(10 * 2**30 * 0.9)
    assert yaml.safe_load(data["gateway.yaml"])["output"]["credentialsSecretRef"] == {
        "name": "om-token",
        "key": "token",
    }


def test_agents_reload_config_from_a_directory_mount_and_keep_state_on_the_host() -> None:
    daemonset = children()[("DaemonSet", "chargeback-agent")]
    pod = daemonset["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"] == ["agent", "--config", "/etc/kubemeter/config/agent.yaml"]
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    assert mounts["config"] == {"name": "config", "mountPath": "/etc/kubemeter/config", "readOnly": True}
    assert "subPath" not in mounts["config"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["state"]["hostPath"] == {
        "path": "/var/lib/kubemeter/billing/chargeback",
        "type": "DirectoryOrCreate",
    }
    assert pod["nodeSelector"] == {"gpu": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    env = {item["name"]: item for item in container["env"]}
    assert env["KUBEMETER_NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    # no config hash in the pod template: a Meter edit must not restart agents
    assert "annotations" not in daemonset["spec"]["template"]["metadata"]


def test_meter_edits_change_the_config_map_but_not_the_agent_pods() -> None:
    other = METER.model_copy(update={"name": "gpu2"})
    before = build_children(REF, SPEC, [METER], SETTINGS)
    after = build_children(REF, SPEC, [METER, other], SETTINGS)
    changed = {child["kind"] for child, again in zip(before, after, strict=True) if child != again}
    assert changed == {"ConfigMap"}


def test_gateway_keeps_its_buffer_on_volumes_and_drains_before_deleting_them() -> None:
    statefulset = children()[("StatefulSet", "chargeback-gateway")]["spec"]
    assert statefulset["replicas"] == 2
    assert statefulset["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Delete",
        "whenScaled": "Retain",
    }
    (claim,) = statefulset["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    pod = statefulset["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["credentials"]["secret"] == {
        "secretName": "om-token",
        "items": [{"key": "token", "path": "token"}],
        "defaultMode": 0o440,
    }
    retain = CollectorSpec.model_validate(
        {**SPEC.to_wire(), "buffer": {"size": "10Gi", "storageClassName": "fast"}}
    )
    kept = build_children(REF, retain, [METER], SETTINGS)
    (gateway,) = [child for child in kept if child["kind"] == "StatefulSet"]
    assert gateway["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"


def test_agent_rbac_is_read_only_and_the_gateway_gets_none() -> None:
    built = children()
    assert get_agent_cluster_role()["metadata"]["name"] == AGENT_CLUSTER_ROLE
    for rule in get_agent_cluster_role()["rules"]:
        assert set(rule["verbs"]) <= {"get", "list", "watch"}
    assert not [kind for kind, _ in built if kind in {"Role", "RoleBinding"}], "agents write nothing"
    binding = built[("ClusterRoleBinding", "kubemeter-agent-billing-chargeback")]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "chargeback-agent", "namespace": "billing"}
    ]
    assert built[("ServiceAccount", "chargeback-gateway")]["automountServiceAccountToken"] is False


def test_builders_are_deterministic() -> None:
    assert build_children(REF, SPEC, [METER], SETTINGS) == build_children(REF, SPEC, [METER], SETTINGS)
