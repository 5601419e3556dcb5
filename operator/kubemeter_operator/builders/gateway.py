"""The gateway: a StatefulSet whose volumes hold the durable buffer, its Services and its PDB.

Pod Security (docs/security.md): restricted, unless hostNetwork is on (then privileged)."""

from __future__ import annotations

from typing import Any

from kubemeter.api.collector import BufferDeletePolicy, CollectorSpec
from kubemeter.api.rendered import (
    CONFIG_DIR,
    GATEWAY_CONFIG_FILENAME,
    GATEWAY_PORT,
    LIVENESS_PATH,
    POD_IP_ENV,
    POD_NAME_ENV,
    READINESS_PATH,
)

from kubemeter_operator.builders.agent import (
    SECRET_FILE_MODE,
    container_security_context,
    host_network_fields,
    http_probe,
    pod_ip_env,
    pod_security_context,
    startup_probe,
)
from kubemeter_operator.builders.common import (
    GATEWAY_CONFIG_HASH_ANNOTATION,
    CollectorRef,
    Manifest,
    labels,
    metadata,
    selector_labels,
)
from kubemeter_operator.builders.configmap import GATEWAY_DATA_DIR, secret_dir
from kubemeter_operator.settings import OperatorSettings

DATA_VOLUME = "data"


def pvc_retention_policy(spec: CollectorSpec) -> dict[str, str]:
    """Volumes outlive their Collector unless it drains: Retain keeps undelivered usage for a new
    Collector of the same name; Drain deletes them only after the operator saw the buffer empty."""
    when_deleted = "Delete" if spec.buffer.on_delete is BufferDeletePolicy.DRAIN else "Retain"
    return {"whenDeleted": when_deleted, "whenScaled": "Retain"}


def get_gateway_statefulset(
    collector: CollectorRef, spec: CollectorSpec, settings: OperatorSettings, gateway_config_hash: str
) -> Manifest:
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": DATA_VOLUME, "mountPath": GATEWAY_DATA_DIR},
    ]
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": collector.config_name}}]
    # Secret volumes (not env vars) follow rotation without a restart; only the named key is mounted.
    named = (
        ("credentials", spec.output.credentials_secret_ref),
        ("ingest-token", spec.gateway.ingest_token_secret_ref),
    )
    by_secret: dict[str, dict[str, Any]] = {}
    for volume_name, secret in named:
        if secret is None:
            continue
        volume = {
            "name": volume_name,
            "secret": {
                "secretName": secret.name,
                "items": [{"key": secret.key, "path": secret.key}],
                "defaultMode": SECRET_FILE_MODE,
            },
        }
        volumes.append(volume)
        by_secret[secret.name] = volume
        mounts.append({"name": volume_name, "mountPath": secret_dir(secret.name), "readOnly": True})
    # output.kafka's Secrets (SASL, TLS): one volume per Secret, only the keys it reads.
    for _, _, ref in spec.output.kafka.secret_files() if spec.output.kafka else []:
        if ref.name not in by_secret:
            volume = {
                "name": f"kafka-{len(by_secret)}",
                "secret": {"secretName": ref.name, "items": [], "defaultMode": SECRET_FILE_MODE},
            }
            volumes.append(volume)
            by_secret[ref.name] = volume
            mounts.append({"name": volume["name"], "mountPath": secret_dir(ref.name), "readOnly": True})
        items = by_secret[ref.name]["secret"]["items"]
        if all(item["key"] != ref.key for item in items):
            items.append({"key": ref.key, "path": ref.key})
    claim: dict[str, Any] = {
        "metadata": {"name": DATA_VOLUME, "labels": labels(collector, "gateway")},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": str(spec.buffer.size)}},
        },
    }
    if spec.buffer.storage_class_name:
        claim["spec"]["storageClassName"] = spec.buffer.storage_class_name
    args = ["gateway", "--config", f"{CONFIG_DIR}/{GATEWAY_CONFIG_FILENAME}"]
    env: list[dict[str, Any]] = [
        {"name": POD_NAME_ENV, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    ]
    if spec.host_network:
        env.append(pod_ip_env())
        args.append(f"--listen-address=$({POD_IP_ENV}):{GATEWAY_PORT}")  # the node's address only
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(collector, collector.gateway_name, "gateway"),
        "spec": {
            "replicas": spec.gateway.replicas,
            "serviceName": collector.gateway_headless_name,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector_labels(collector, "gateway")},
            "persistentVolumeClaimRetentionPolicy": pvc_retention_policy(spec),
            "template": {
                "metadata": {
                    "labels": labels(collector, "gateway"),
                    "annotations": {GATEWAY_CONFIG_HASH_ANNOTATION: gateway_config_hash},
                },
                "spec": {
                    "serviceAccountName": collector.gateway_name,
                    "automountServiceAccountToken": False,
                    # Long enough to finish an in-flight batch and fsync before the volume moves.
                    "terminationGracePeriodSeconds": 60,
                    **host_network_fields(spec),
                    "securityContext": pod_security_context(),
                    "nodeSelector": dict(spec.gateway.node_selector),
                    "tolerations": [toleration.to_wire() for toleration in spec.gateway.tolerations],
                    "containers": [
                        {
                            "name": "gateway",
                            "image": settings.image,
                            "imagePullPolicy": settings.image_pull_policy,
                            "args": args,
                            "env": env,
                            "ports": [{"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"}],
                            "startupProbe": startup_probe(LIVENESS_PATH, "http"),
                            "livenessProbe": http_probe(
                                LIVENESS_PATH, "http", period_seconds=20, failure_threshold=3
                            ),
                            # 503 while the buffer is full or closed (GatewayApp.readyz)
                            "readinessProbe": http_probe(
                                READINESS_PATH, "http", period_seconds=5, failure_threshold=1
                            ),
                            "resources": spec.gateway.resources.to_wire(),
                            "securityContext": container_security_context(),
                            "volumeMounts": mounts,
                        }
                    ],
                    "volumes": volumes,
                },
            },
            "volumeClaimTemplates": [claim],
        },
    }


def get_gateway_service(collector: CollectorRef) -> Manifest:
    """What agents (and applications) send events to."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(collector, collector.gateway_name, "gateway"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(collector, "gateway"),
            "ports": [{"name": "http", "port": GATEWAY_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def get_gateway_headless_service(collector: CollectorRef) -> Manifest:
    """Stable per-replica DNS names for the StatefulSet."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(collector, collector.gateway_headless_name, "gateway"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": selector_labels(collector, "gateway"),
            "ports": [{"name": "http", "port": GATEWAY_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def get_gateway_pod_disruption_budget(collector: CollectorRef) -> Manifest:
    """One gateway down at a time during node drains; agents spool meanwhile."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(collector, collector.gateway_name, "gateway"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(collector, "gateway")}},
    }
