"""The pods the operator writes keep every Pod Security control they can (docs/security.md): the
image's uid 65532 unless the PodResources socket needs uid 0, no capabilities, seccomp RuntimeDefault,
Secrets readable by the pod's group only, probes that do not restart a pod for an API-server outage,
and hostNetwork only when asked for, bound to the pod's address. Admission by the real API server and
the real kubelet is checked in tests/e2e/test_helm_real_node.py."""

from __future__ import annotations

from typing import Any

from kubemeter.api.collector import CollectorSpec
from kubemeter.api.rendered import LIVENESS_PATH, READINESS_PATH
from kubemeter_operator.builders.agent import get_agent_daemonset
from kubemeter_operator.builders.common import CollectorRef
from kubemeter_operator.builders.configmap import render_agent_config
from kubemeter_operator.builders.gateway import get_gateway_statefulset
from kubemeter_operator.settings import OperatorSettings

REF = CollectorRef(namespace="billing", name="chargeback", uid="uid-c")
OUTPUT = {"type": "lago", "url": "http://lago", "credentialsSecretRef": {"name": "lago", "key": "key"}}
SPEC = CollectorSpec.model_validate({"output": OUTPUT})
HOST_NETWORK = CollectorSpec.model_validate(
    {"output": OUTPUT, "hostNetwork": True, "agent": {"gatewayUrl": "http://127.0.0.1:8480"}}
)


def agent_pod(spec: CollectorSpec = SPEC, **kwargs: Any) -> dict[str, Any]:
    daemonset = get_agent_daemonset(REF, spec, OperatorSettings(), ["prom-auth"], **kwargs)
    pod: dict[str, Any] = daemonset["spec"]["template"]["spec"]
    return pod


def gateway_pod(spec: CollectorSpec = SPEC) -> dict[str, Any]:
    pod: dict[str, Any] = get_gateway_statefulset(REF, spec, OperatorSettings(), "h")["spec"]["template"][
        "spec"
    ]
    return pod


def test_agent_runs_as_the_image_user_with_seccomp_and_fs_group() -> None:
    pod = agent_pod()
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    context = pod["containers"][0]["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
    assert "runAsUser" not in context  # the pod's 65532


def test_the_state_hostpath_is_handed_to_the_agent_user_by_a_chown_only_init_step() -> None:
    for needs_pod_resources, uid in ((False, 65532), (True, 0)):
        pod = agent_pod(needs_pod_resources=needs_pod_resources)
        (init,) = pod["initContainers"]
        assert init["command"][2].startswith(f"chown -R {uid}:65532 ")
        assert init["command"][3] == "/var/lib/kubemeter"
        assert init["securityContext"]["capabilities"] == {
            "drop": ["ALL"],
            "add": ["CHOWN", "DAC_READ_SEARCH", "FOWNER"],
        }
        assert init["securityContext"]["allowPrivilegeEscalation"] is False
        assert init["volumeMounts"] == [{"name": "state", "mountPath": "/var/lib/kubemeter"}]


def test_only_an_nvml_collector_runs_its_agent_as_uid_0_and_still_without_capabilities() -> None:
    context = agent_pod(needs_pod_resources=True)["containers"][0]["securityContext"]
    assert context["runAsUser"] == 0 and context["runAsNonRoot"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True


def test_secret_volumes_are_readable_by_the_pod_group_only() -> None:
    agent_secret = {v["name"]: v for v in agent_pod()["volumes"]}["secret-prom-auth"]["secret"]
    gateway_secret = {v["name"]: v for v in gateway_pod()["volumes"]}["credentials"]["secret"]
    for secret in (agent_secret, gateway_secret):
        assert secret["defaultMode"] == 0o440
    assert agent_pod()["securityContext"]["fsGroup"] == gateway_pod()["securityContext"]["fsGroup"] == 65532


def test_liveness_never_asks_the_api_server_and_readiness_does() -> None:
    agent = agent_pod()["containers"][0]
    gateway = gateway_pod()["containers"][0]
    for container in (agent, gateway):
        assert container["livenessProbe"]["httpGet"]["path"] == LIVENESS_PATH
        assert container["startupProbe"]["httpGet"]["path"] == LIVENESS_PATH
        assert container["readinessProbe"]["httpGet"]["path"] == READINESS_PATH
        # liveness may fail for a minute before a restart; startup gives two minutes
        live, start = container["livenessProbe"], container["startupProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] >= 60
        assert start["periodSeconds"] * start["failureThreshold"] >= 120


def test_the_gateway_pod_meets_restricted() -> None:
    pod = gateway_pod()
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not any("hostPath" in volume for volume in pod["volumes"])
    assert "hostNetwork" not in pod


def test_host_network_is_off_by_default_and_binds_the_pod_address_when_on() -> None:
    assert "hostNetwork" not in agent_pod()
    for pod, flag in (
        (agent_pod(HOST_NETWORK), "--metrics-host="),
        (gateway_pod(HOST_NETWORK), "--listen-address="),
    ):
        assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
        container = pod["containers"][0]
        env = {item["name"]: item for item in container["env"]}
        assert env["KUBEMETER_POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        (bind,) = [arg for arg in container["args"] if arg.startswith(flag)]
        assert bind.startswith(f"{flag}$(KUBEMETER_POD_IP)")


def test_agents_find_the_gateway_at_the_url_the_collector_names() -> None:
    assert render_agent_config(REF, SPEC, [], "c").gateway_url == "http://chargeback-gateway.billing.svc:8480"
    assert render_agent_config(REF, HOST_NETWORK, [], "c").gateway_url == "http://127.0.0.1:8480"


def test_pods_get_the_api_server_address_only_when_the_operator_is_told_one() -> None:
    default = {item["name"] for item in agent_pod()["containers"][0]["env"]}
    assert "KUBERNETES_SERVICE_HOST" not in default
    settings = OperatorSettings(pod_api_server="127.0.0.1:36443")
    pod = get_agent_daemonset(REF, SPEC, settings)["spec"]["template"]["spec"]
    env = {item["name"]: item.get("value") for item in pod["containers"][0]["env"]}
    assert env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1" and env["KUBERNETES_SERVICE_PORT"] == "36443"


def test_the_agent_mounts_its_service_account_token_explicitly_and_the_gateway_none() -> None:
    pod = agent_pod()
    assert pod["automountServiceAccountToken"] is False
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    sources = volumes["kube-api-access"]["projected"]["sources"]
    assert sources[0]["serviceAccountToken"]["path"] == "token"
    assert sources[1]["configMap"]["name"] == "kube-root-ca.crt"
    mounts = {mount["name"]: mount for mount in pod["containers"][0]["volumeMounts"]}
    assert mounts["kube-api-access"] == {
        "name": "kube-api-access",
        "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
        "readOnly": True,
    }
    gateway = gateway_pod()
    assert gateway["automountServiceAccountToken"] is False
    assert not any("projected" in volume for volume in gateway["volumes"])


def test_gateways_are_placed_by_their_own_node_selector_and_tolerations() -> None:
    toleration = {"key": "dedicated", "operator": "Equal", "value": "billing", "effect": "NoSchedule"}
    spec = CollectorSpec.model_validate(
        {"output": OUTPUT, "gateway": {"nodeSelector": {"disk": "ssd"}, "tolerations": [toleration]}}
    )
    pod = gateway_pod(spec)
    assert pod["nodeSelector"] == {"disk": "ssd"}
    assert pod["tolerations"] == [toleration]
    assert gateway_pod()["nodeSelector"] == {} and gateway_pod()["tolerations"] == []


def test_agents_verify_kubelets_with_the_cluster_ca_or_the_bundle_the_collector_names() -> None:
    env = {item["name"]: item.get("value") for item in agent_pod()["containers"][0]["env"]}
    assert env["KUBEMETER_KUBELET_CA_FILE"] == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    spec = CollectorSpec.model_validate(
        {"output": OUTPUT, "agent": {"kubeletCaSecretRef": {"name": "kubelet-ca", "key": "ca.crt"}}}
    )
    pod = agent_pod(spec)
    env = {item["name"]: item.get("value") for item in pod["containers"][0]["env"]}
    assert env["KUBEMETER_KUBELET_CA_FILE"] == "/etc/kubemeter/secrets/kubelet-ca/ca.crt"
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["secret-kubelet-ca"]["secret"] == {"secretName": "kubelet-ca", "defaultMode": 0o440}
