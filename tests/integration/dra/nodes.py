"""Kwok nodes of a test's own (so deleting one harms no other test) and the DRA objects a GPU driver
would publish for them: a ResourceSlice per node, DeviceClasses, claim templates."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from testbed.controlplane import ControlPlane, free_port, wait_for

DRIVER = "gpu.nvidia.com"
A100 = "NVIDIA A100-SXM4-80GB"


def seconds_ms(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def add_node(
    cluster: ControlPlane,
    name: str,
    capacity: dict[str, str],
    labels: dict[str, str],
    internal_ip: str = "127.0.0.1",
    kubelet_port: int | None = None,
) -> dict[str, Any]:
    """A kwok node that reaches Ready; returns the Node as the API server has it. ``internal_ip`` and
    ``kubelet_port`` say where its kubelet is (a stand-in may listen there)."""
    manifest = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"type": "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", **labels},
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    status = {
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "addresses": [{"type": "InternalIP", "address": internal_ip}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port or free_port()}},
        }
    }
    cluster.kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p", json.dumps(status))

    def ready() -> dict[str, Any] | None:
        node = cluster.get_json("node", name)
        conditions = node["status"].get("conditions") or []
        return node if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions) else None

    return dict(wait_for(ready, timeout_s=30, what=f"node {name} Ready"))


def gpu(name: str, product: str = A100) -> dict[str, Any]:
    return {
        "name": name,
        "attributes": {
            "type": {"string": "gpu"},
            "uuid": {"string": f"GPU-{name}"},
            "productName": {"string": product},
        },
        "capacity": {"memory": {"value": "80Gi"}},
    }


def mig(name: str, profile: str = "1g.10gb", product: str = A100) -> dict[str, Any]:
    return {
        "name": name,
        "attributes": {
            "type": {"string": "mig"},
            "uuid": {"string": f"MIG-{name}"},
            "profile": {"string": profile},
            "productName": {"string": product},
        },
        "capacity": {"memory": {"value": "10Gi"}},
    }


def publish_slice(cluster: ControlPlane, node: str, devices: list[dict[str, Any]]) -> None:
    resource_slice = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": f"{node}-{DRIVER}"},
        "spec": {
            "driver": DRIVER,
            "nodeName": node,
            "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": devices,
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(resource_slice))


def device_classes(cluster: ControlPlane) -> None:
    """A class for whole GPUs and one for 1g.10gb MIG devices, with CEL selectors as NVIDIA's have."""
    for name, expression in (
        ("gpu.nvidia.com", f"device.driver == '{DRIVER}' && device.attributes['{DRIVER}'].type == 'gpu'"),
        (
            "mig-1g.10gb.nvidia.com",
            f"device.driver == '{DRIVER}' && device.attributes['{DRIVER}'].type == 'mig' && "
            f"device.attributes['{DRIVER}'].profile == '1g.10gb'",
        ),
    ):
        device_class = {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "DeviceClass",
            "metadata": {"name": name},
            "spec": {"selectors": [{"cel": {"expression": expression}}]},
        }
        cluster.kubectl("apply", "-f", "-", input=json.dumps(device_class))


def claim_spec(device_class: str) -> dict[str, Any]:
    return {"devices": {"requests": [{"name": "gpu", "exactly": {"deviceClassName": device_class}}]}}


def claim_templates(cluster: ControlPlane, namespace: str) -> None:
    for name, device_class in (("one-gpu", "gpu.nvidia.com"), ("one-mig", "mig-1g.10gb.nvidia.com")):
        template = {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaimTemplate",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"spec": claim_spec(device_class)},
        }
        cluster.kubectl("apply", "-f", "-", input=json.dumps(template))


def shared_claim(cluster: ControlPlane, namespace: str, name: str) -> None:
    claim = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": name, "namespace": namespace},
        "spec": claim_spec("gpu.nvidia.com"),
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(claim))


def pod_with_claim(
    name: str, node: str, claim: dict[str, str], requests: dict[str, str] | None = None
) -> dict[str, Any]:
    """A pod for the scheduler (no nodeName): pinned to ``node`` by label, its devices from ``claim``
    (``{"resourceClaimTemplateName": ...}`` or ``{"resourceClaimName": ...}``)."""
    container: dict[str, Any] = {"name": "main", "image": "fake", "resources": {"claims": [{"name": "gpu"}]}}
    if requests:
        container["resources"]["requests"] = requests
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "tolerations": [{"operator": "Exists"}],
            "resourceClaims": [{"name": "gpu", **claim}],
            "containers": [container],
            "terminationGracePeriodSeconds": 30,
        },
    }
