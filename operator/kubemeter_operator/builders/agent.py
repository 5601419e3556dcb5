"""The agent DaemonSet: one pod per selected node, state on a hostPath so a restart resumes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kubemeter.api.collector import CollectorSpec
from kubemeter.api.rendered import (
    AGENT_CONFIG_FILENAME,
    AGENT_METRICS_PORT,
    CONFIG_DIR,
    HEALTH_PATH,
    HOST_PROC_DIR,
    NODE_NAME_ENV,
    POD_NAME_ENV,
)

from kubemeter_operator.builders.common import CollectorRef, Manifest, labels, metadata, selector_labels
from kubemeter_operator.builders.configmap import AGENT_STATE_DIR, secret_dir
from kubemeter_operator.settings import OperatorSettings

POD_RESOURCES_DIR = "/var/lib/kubelet/pod-resources"


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


def http_probe(path: str, port: str, period_seconds: int, failure_threshold: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period_seconds,
        "failureThreshold": failure_threshold,
        "timeoutSeconds": 5,
    }


def tolerations(spec: CollectorSpec) -> list[dict[str, Any]]:
    return [toleration.to_wire() for toleration in spec.tolerations]


def get_agent_daemonset(
    collector: CollectorRef,
    spec: CollectorSpec,
    settings: OperatorSettings,
    agent_secret_names: Sequence[str] = (),
) -> Manifest:
    """``agent_secret_names``: Secrets the Meters' sources need (Run:ai, Prometheus credentials), mounted
    read-only."""
    secret_volumes = [
        {"name": f"secret-{name}", "secret": {"secretName": name, "defaultMode": 0o440}}
        for name in sorted(set(agent_secret_names))
    ]
    secret_mounts = [
        {"name": f"secret-{name}", "mountPath": secret_dir(name), "readOnly": True}
        for name in sorted(set(agent_secret_names))
    ]
    pod_spec: dict[str, Any] = {
        "serviceAccountName": collector.agent_name,
        "automountServiceAccountToken": True,
        "terminationGracePeriodSeconds": 30,
        "nodeSelector": dict(spec.node_selector),
        "tolerations": tolerations(spec),
        "containers": [
            {
                "name": "agent",
                "image": settings.image,
                "imagePullPolicy": settings.image_pull_policy,
                "args": ["agent", "--config", f"{CONFIG_DIR}/{AGENT_CONFIG_FILENAME}"],
                "env": [
                    {"name": NODE_NAME_ENV, "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": POD_NAME_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    # NVML through the NVIDIA container runtime, without claiming a GPU
                    {"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"},
                    {"name": "NVIDIA_DRIVER_CAPABILITIES", "value": "utility"},
                ],
                "ports": [{"name": "metrics", "containerPort": AGENT_METRICS_PORT, "protocol": "TCP"}],
                "livenessProbe": http_probe(HEALTH_PATH, "metrics", period_seconds=20, failure_threshold=3),
                "readinessProbe": http_probe(HEALTH_PATH, "metrics", period_seconds=10, failure_threshold=1),
                "resources": spec.agent.resources.to_wire(),
                "securityContext": container_security_context(),
                "volumeMounts": [
                    {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                    {"name": "state", "mountPath": AGENT_STATE_DIR},
                    {"name": "pod-resources", "mountPath": POD_RESOURCES_DIR, "readOnly": True},
                    # NVML reports host PIDs; their /proc/<pid>/cgroup names the pod (no hostPID needed).
                    {"name": "host-proc", "mountPath": HOST_PROC_DIR, "readOnly": True},
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
            {"name": "pod-resources", "hostPath": {"path": POD_RESOURCES_DIR, "type": "DirectoryOrCreate"}},
            {"name": "host-proc", "hostPath": {"path": "/proc", "type": "Directory"}},
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
