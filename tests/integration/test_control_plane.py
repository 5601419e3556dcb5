"""The local control plane is real: later RBAC, garbage-collection and scheduling tests rely on it."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from testbed.controlplane import REPO_ROOT, ControlPlane, wait_for

pytestmark = pytest.mark.integration


def test_api_server_answers_readyz(cluster: ControlPlane) -> None:
    request = urllib.request.Request(
        f"{cluster.api_url}/readyz", headers={"Authorization": f"Bearer {cluster.token}"}
    )
    with urllib.request.urlopen(request, context=cluster.ssl_context(verify=True), timeout=5) as response:
        assert response.status == 200
        assert response.read() == b"ok"


def test_fake_nodes_advertise_gpus_and_a_kubelet_on_their_own_loopback_address(cluster: ControlPlane) -> None:
    nodes = {n["metadata"]["name"]: n for n in cluster.get_json("nodes")["items"]}
    gpu_nodes = [n for n in cluster.nodes if n.capacity.get("nvidia.com/gpu") == "8"]
    assert len(gpu_nodes) >= 3
    for node in gpu_nodes:
        live = nodes[node.name]
        assert live["status"]["capacity"]["nvidia.com/gpu"] == "8"
        assert live["metadata"]["labels"]["nvidia.com/gpu.product"].startswith("NVIDIA-")
        assert {"type": "InternalIP", "address": node.internal_ip} in live["status"]["addresses"]
        assert (
            live["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] == cluster.kubelet_ports[node.name]
        )


def test_crd_applied_becomes_established(cluster: ControlPlane) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.kubemeter.io"},
        "spec": {
            "group": "example.kubemeter.io",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {"type": "object", "properties": {"size": {"type": "integer"}}}
                            },
                        }
                    },
                }
            ],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(crd))
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/widgets.example.kubemeter.io", "--timeout=60s"
    )
    cluster.kubectl("delete", "crd", "widgets.example.kubemeter.io", "--wait=false")


def test_daemonset_lands_one_running_pod_on_each_gpu_node(cluster: ControlPlane, namespace: str) -> None:
    daemonset = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "agent", "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": {"app": "agent"}},
            "template": {
                "metadata": {"labels": {"app": "agent"}},
                "spec": {
                    "nodeSelector": {"nvidia.com/gpu.present": "true"},
                    "containers": [{"name": "agent", "image": "kubemeter:test"}],
                },
            },
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(daemonset))
    gpu_nodes = {n.name for n in cluster.nodes if n.labels.get("nvidia.com/gpu.present") == "true"}

    def running_nodes() -> set[str] | None:
        pods = cluster.get_json("pods", "-n", namespace)["items"]
        nodes = [p["spec"].get("nodeName") for p in pods if p["status"].get("phase") == "Running"]
        return set(nodes) if sorted(nodes) == sorted(gpu_nodes) else None

    assert wait_for(running_nodes, timeout_s=90, what="one Running agent pod per GPU node") == gpu_nodes


def test_statefulset_volume_claim_template_gets_a_bound_claim(cluster: ControlPlane, namespace: str) -> None:
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "gateway", "namespace": namespace},
        "spec": {
            "serviceName": "gateway",
            "replicas": 1,
            "selector": {"matchLabels": {"app": "gateway"}},
            "template": {
                "metadata": {"labels": {"app": "gateway"}},
                "spec": {
                    "nodeSelector": {"kubernetes.io/hostname": "kwok-cpu-0"},
                    "containers": [
                        {
                            "name": "gateway",
                            "image": "kubemeter:test",
                            "volumeMounts": [{"name": "buffer", "mountPath": "/buffer"}],
                        }
                    ],
                },
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "buffer"},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
                }
            ],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(statefulset))
    claim = wait_for(
        lambda: (
            cluster.get_json("pvc", "buffer-gateway-0", "-n", namespace)
            if cluster.get_json("pvc", "buffer-gateway-0", "-n", namespace)["status"].get("phase") == "Bound"
            else None
        ),
        timeout_s=90,
        what="the gateway's claim to be Bound",
    )
    assert claim["spec"]["storageClassName"] == "standard"
    wait_for(
        lambda: cluster.get_json("pod", "gateway-0", "-n", namespace)["status"].get("phase") == "Running",
        timeout_s=90,
        what="gateway-0 Running on its bound claim",
    )


def test_deleting_an_owner_garbage_collects_its_dependents(cluster: ControlPlane, namespace: str) -> None:
    owner = json.loads(cluster.kubectl("create", "configmap", "owner", "-n", namespace, "-o", "json").stdout)
    dependent = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "dependent",
            "namespace": namespace,
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "name": "owner",
                    "uid": owner["metadata"]["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(dependent))
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace)
    wait_for(
        lambda: (
            cluster.kubectl("get", "configmap", "dependent", "-n", namespace, check=False).returncode != 0
        ),
        timeout_s=60,
        what="the garbage collector to delete the dependent",
    )


def test_service_account_token_is_refused_what_its_role_does_not_grant(
    cluster: ControlPlane, namespace: str, tmp_path: object
) -> None:
    cluster.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    cluster.kubectl(
        "create", "role", "read-configmaps", "-n", namespace, "--verb=get,list", "--resource=configmaps"
    )
    cluster.kubectl(
        "create",
        "rolebinding",
        "reader",
        "-n",
        namespace,
        "--role=read-configmaps",
        f"--serviceaccount={namespace}:reader",
    )
    token = cluster.kubectl("create", "token", "reader", "-n", namespace).stdout.strip()
    kubeconfig = tmp_path / "reader.kubeconfig"
    kubeconfig.write_text(cluster.kubeconfig_text(token=token, user="reader"))

    allowed = cluster.kubectl("get", "configmaps", "-n", namespace, kubeconfig=kubeconfig, check=False)
    assert allowed.returncode == 0, allowed.stderr
    with pytest.raises(subprocess.CalledProcessError) as refused:
        cluster.kubectl("create", "configmap", "x", "-n", namespace, kubeconfig=kubeconfig)
    assert "forbidden" in refused.value.stderr
    assert f"system:serviceaccount:{namespace}:reader" in refused.value.stderr
    secrets = cluster.kubectl("get", "secrets", "-n", namespace, kubeconfig=kubeconfig, check=False)
    assert secrets.returncode != 0 and "forbidden" in secrets.stderr


def test_a_killed_test_process_leaves_no_control_plane_process_behind(tmp_path: Path) -> None:
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from testbed.controlplane import ControlPlane\n"
        "plane = ControlPlane(Path(sys.argv[1]))\n"
        "plane.start()\n"
        "print(' '.join(str(c.process.pid) for c in plane.components), flush=True)\n"
        "time.sleep(600)\n"
    )
    runner = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "plane")],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert runner.stdout is not None
    pids = [int(pid) for pid in runner.stdout.readline().split()]
    assert len(pids) == 5, "etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok"
    runner.kill()
    runner.wait()

    def all_gone() -> bool:
        return not any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in pids)

    assert wait_for(all_gone, timeout_s=30, what="every component to exit with its parent")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (FileNotFoundError, IndexError):
        return "zombie"
