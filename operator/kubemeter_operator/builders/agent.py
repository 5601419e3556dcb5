"""The agent DaemonSet: one pod per selected node, state on a hostPath so a restart resumes.

Pod Security (docs/security.md): the state hostPath makes the pod need the level privileged, but it
keeps every other control of restricted: seccomp RuntimeDefault, no privilege escalation, every
capability dropped, a read-only root filesystem, and uid 65532. Only a Collector with an NVML meter
runs its agent as uid 0 (still without capabilities), because the kubelet's PodResources socket is
root:root in a 0750 directory, and only then is the host's /proc mounted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kubemeter.api.collector import CollectorSpec
from kubemeter.api.rendered import (
    AGENT_CONFIG_FILENAME,
    AGENT_METRICS_PORT,
    CONFIG_DIR,
    HOST_PROC_DIR,
    LIVENESS_PATH,
    NODE_NAME_ENV,
    POD_IP_ENV,
    POD_NAME_ENV,
    READINESS_PATH,
)
from kubemeter.sources.kubelet import KUBELET_CA_FILE_ENV

from kubemeter_operator.builders.common import CollectorRef, Manifest, labels, metadata, selector_labels
from kubemeter_operator.builders.configmap import AGENT_STATE_DIR, secret_dir
from kubemeter_operator.settings import OperatorSettings

POD_RESOURCES_DIR = "/var/lib/kubelet/pod-resources"
# The image's user (Dockerfile: USER 65532:65532); numeric so runAsNonRoot can check it.
IMAGE_UID = 65532
ROOT_UID = 0
# Secret files are root:<fsGroup> 0440: readable by the agent through its group, by no one else.
SECRET_FILE_MODE = 0o440


def host_state_path(collector: CollectorRef, settings: OperatorSettings) -> str:
    """Per Collector, so two Collectors on one node never share a spool or checkpoints."""
    return f"{settings.host_state_root}/{collector.namespace}/{collector.name}"


def container_security_context() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_security_context() -> dict[str, Any]:
    """The image's user, its group on every volume that supports ownership (Secrets, PVCs)."""
    return {
        "runAsNonRoot": True,
        "runAsUser": IMAGE_UID,
        "runAsGroup": IMAGE_UID,
        "fsGroup": IMAGE_UID,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def http_probe(path: str, port: str, period_seconds: int, failure_threshold: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period_seconds,
        "failureThreshold": failure_threshold,
        "timeoutSeconds": 5,
    }


def startup_probe(path: str, port: str) -> dict[str, Any]:
    """Up to 120 s to start (imports under a CPU limit, a spool to reopen) before liveness counts."""
    return http_probe(path, port, period_seconds=2, failure_threshold=60)


def pod_ip_env() -> dict[str, Any]:
    return {"name": POD_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}


def host_network_fields(spec: CollectorSpec) -> dict[str, Any]:
    """hostNetwork pods still resolve Service names through the cluster DNS (where there is one)."""
    if not spec.host_network:
        return {}
    return {"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet"}


def api_server_env(settings: OperatorSettings) -> list[dict[str, Any]]:
    """In-cluster clients find the API server through these; set only where the Service IP that the
    kubelet puts there is not reachable from the pod."""
    if not settings.pod_api_server:
        return []
    host, _, port = settings.pod_api_server.rpartition(":")
    return [
        {"name": "KUBERNETES_SERVICE_HOST", "value": host.strip("[]")},
        {"name": "KUBERNETES_SERVICE_PORT", "value": port},
    ]


SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
TOKEN_EXPIRATION_SECONDS = 3607  # what the ServiceAccount admission plugin would mount


def service_account_token_volume() -> dict[str, Any]:
    """The ServiceAccount token, CA and namespace, mounted explicitly (automount off): the same files
    the ServiceAccount admission plugin would add, also where it is not enabled. The kubelet rotates
    the token; the agent re-reads it."""
    return {
        "name": "kube-api-access",
        "projected": {
            "defaultMode": 0o444,
            "sources": [
                {"serviceAccountToken": {"path": "token", "expirationSeconds": TOKEN_EXPIRATION_SECONDS}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {
                    "downwardAPI": {
                        "items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]
                    }
                },
            ],
        },
    }


def tolerations(spec: CollectorSpec) -> list[dict[str, Any]]:
    return [toleration.to_wire() for toleration in spec.tolerations]


def state_owner_init_container(settings: OperatorSettings, agent_uid: int) -> dict[str, Any]:
    """The kubelet creates a missing hostPath root:root 0755 and applies no fsGroup to hostPaths, so
    this step hands the state directory to the agent's user before it starts. Recursive, because a
    Collector that gained or lost an NVML meter switches that user. Root with CHOWN, FOWNER and
    DAC_READ_SEARCH only: on a restart the directory is already the agent's 0750, and without
    DAC_READ_SEARCH uid 0 could not list it to recurse (the init step would fail every restart)."""
    return {
        "name": "state-owner",
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": [
            "/bin/sh",
            "-c",
            f'chown -R {agent_uid}:{IMAGE_UID} "$0" && chmod 0750 "$0"',
            AGENT_STATE_DIR,
        ],
        "securityContext": {
            "runAsUser": ROOT_UID,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["CHOWN", "DAC_READ_SEARCH", "FOWNER"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "volumeMounts": [{"name": "state", "mountPath": AGENT_STATE_DIR}],
    }


def get_agent_daemonset(
    collector: CollectorRef,
    spec: CollectorSpec,
    settings: OperatorSettings,
    agent_secret_names: Sequence[str] = (),
    needs_pod_resources: bool = False,
) -> Manifest:
    """``agent_secret_names``: Secrets the Meters' sources need (Run:ai, Prometheus credentials), mounted
    read-only. ``needs_pod_resources``: a Meter reads NVML, which maps GPUs to pods through the kubelet's
    PodResources socket and host PIDs to pods through the host's /proc."""
    agent_uid = ROOT_UID if needs_pod_resources else IMAGE_UID
    container_context = container_security_context()
    if needs_pod_resources:
        # uid 0 is the owner of the socket and its directory; no capability is needed for that.
        container_context |= {"runAsUser": ROOT_UID, "runAsNonRoot": False}
    device_mounts: list[dict[str, Any]] = []
    device_volumes: list[dict[str, Any]] = []
    if needs_pod_resources:
        device_mounts = [
            {"name": "pod-resources", "mountPath": POD_RESOURCES_DIR, "readOnly": True},
            # NVML reports host PIDs; their /proc/<pid>/cgroup names the pod (no hostPID needed).
            {"name": "host-proc", "mountPath": HOST_PROC_DIR, "readOnly": True},
        ]
        device_volumes = [
            {"name": "pod-resources", "hostPath": {"path": POD_RESOURCES_DIR, "type": "Directory"}},
            {"name": "host-proc", "hostPath": {"path": "/proc", "type": "Directory"}},
        ]
    kubelet_ca = spec.agent.kubelet_ca_secret_ref
    if kubelet_ca is not None and kubelet_ca.name not in agent_secret_names:
        agent_secret_names = [*agent_secret_names, kubelet_ca.name]
    kubelet_ca_file = (
        f"{secret_dir(kubelet_ca.name)}/{kubelet_ca.key}" if kubelet_ca else f"{SERVICE_ACCOUNT_DIR}/ca.crt"
    )
    secret_volumes = [
        {"name": f"secret-{name}", "secret": {"secretName": name, "defaultMode": SECRET_FILE_MODE}}
        for name in sorted(set(agent_secret_names))
    ]
    secret_mounts = [
        {"name": f"secret-{name}", "mountPath": secret_dir(name), "readOnly": True}
        for name in sorted(set(agent_secret_names))
    ]
    args = ["agent", "--config", f"{CONFIG_DIR}/{AGENT_CONFIG_FILENAME}"]
    env: list[dict[str, Any]] = [
        {"name": NODE_NAME_ENV, "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {"name": POD_NAME_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": KUBELET_CA_FILE_ENV, "value": kubelet_ca_file},
        *api_server_env(settings),
    ]
    if needs_pod_resources:
        # NVML through the NVIDIA container runtime, without claiming a GPU
        env += [
            {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"},
            {"name": "NVIDIA_DRIVER_CAPABILITIES", "value": "utility"},
        ]
    if spec.host_network:
        env.append(pod_ip_env())
        args.append(f"--metrics-host=$({POD_IP_ENV})")  # the node's address, not every interface
    pod_spec: dict[str, Any] = {
        "serviceAccountName": collector.agent_name,
        "automountServiceAccountToken": False,  # mounted explicitly, see service_account_token_volume
        "terminationGracePeriodSeconds": 30,
        **host_network_fields(spec),
        "securityContext": pod_security_context(),
        "nodeSelector": dict(spec.node_selector),
        "tolerations": tolerations(spec),
        "initContainers": [state_owner_init_container(settings, agent_uid)],
        "containers": [
            {
                "name": "agent",
                "image": settings.image,
                "imagePullPolicy": settings.image_pull_policy,
                "args": args,
                "env": env,
                "ports": [{"name": "metrics", "containerPort": AGENT_METRICS_PORT, "protocol": "TCP"}],
                "startupProbe": startup_probe(LIVENESS_PATH, "metrics"),
                "livenessProbe": http_probe(LIVENESS_PATH, "metrics", period_seconds=20, failure_threshold=3),
                "readinessProbe": http_probe(
                    READINESS_PATH, "metrics", period_seconds=10, failure_threshold=1
                ),
                "resources": spec.agent.resources.to_wire(),
                "securityContext": container_context,
                "volumeMounts": [
                    {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                    {"name": "state", "mountPath": AGENT_STATE_DIR},
                    {"name": "kube-api-access", "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": True},
                    *device_mounts,
                    *secret_mounts,
                ],
            }
        ],
        "volumes": [
            # Mounted as a directory (not subPath) so kubelet refreshes it and agents reload in place.
            {"name": "config", "configMap": {"name": collector.config_name}},
            {
                "name": "state",
                "hostPath": {"path": host_state_path(collector, settings), "type": "DirectoryOrCreate"},
            },
            service_account_token_volume(),
            *device_volumes,
            *secret_volumes,
        ],
    }
    if spec.agent.priority_class_name:
        pod_spec["priorityClassName"] = spec.agent.priority_class_name
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": metadata(collector, collector.agent_name, "agent"),
        "spec": {
            "selector": {"matchLabels": selector_labels(collector, "agent")},
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": labels(collector, "agent")},
                "spec": pod_spec,
            },
        },
    }
