"""The real node ``real-0`` (containerd, runc, kubelet) is a real Kubernetes node beside the kwok nodes:
Ready, running real containers whose exit codes and logs come back, serving the kubelet API and
PodResources, off limits to pods that do not ask for it, and gone without a trace when stopped."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from kubemeter.sources.podresources.generated import api_pb2, api_pb2_grpc

from testbed.controlplane import ControlPlane, wait_for
from testbed.realnode import (
    BUSYBOX_IMAGE,
    DATA_DIR,
    KUBELET_ROOT,
    KUBELET_SYSCTLS,
    NAME,
    POD_RESOURCES_SOCKET,
    RUN_DIR,
    TAINT_KEY,
    RealNode,
    on_real_node,
)

pytestmark = pytest.mark.integration


def busybox_pod(name: str, script: str, **spec: Any) -> dict[str, Any]:
    return on_real_node(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "main", "image": BUSYBOX_IMAGE, "command": ["sh", "-c", script]}],
                **spec,
            },
        }
    )


def apply(cluster: ControlPlane, namespace: str, manifest: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))


def pod(cluster: ControlPlane, namespace: str, name: str) -> Any:
    return cluster.get_json("pod", "-n", namespace, name)


def terminated(cluster: ControlPlane, namespace: str, name: str) -> dict[str, Any] | None:
    statuses = pod(cluster, namespace, name)["status"].get("containerStatuses", [])
    state = statuses[0]["state"].get("terminated") if statuses else None
    return state  # type: ignore[no-any-return]


def seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def test_real_node_is_ready_beside_the_kwok_nodes_at_the_api_servers_version(
    cluster: ControlPlane, real_node: RealNode
) -> None:
    table = cluster.kubectl("get", "nodes", "--no-headers").stdout
    rows = {line.split()[0]: line.split()[1] for line in table.splitlines()}
    assert rows[NAME] == "Ready"
    for kwok in cluster.nodes:
        assert rows[kwok.name] == "Ready"
    node = cluster.get_json("node", NAME)
    server = json.loads(cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]
    assert node["status"]["nodeInfo"]["kubeletVersion"] == server
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://2.4.")
    assert node["status"]["addresses"] == [{"type": "InternalIP", "address": "127.0.0.1"}]
    assert {"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"} in node["spec"]["taints"]
    assert node["metadata"]["annotations"].get("kwok.x-k8s.io/node") is None
    print(
        f"real node timings (s): {json.dumps(real_node.timings_s)}; RSS: {json.dumps(real_node.rss_bytes())}"
    )


def test_busybox_pod_on_real_node_runs_exits_zero_and_its_logs_are_served(
    cluster: ControlPlane, real_node: RealNode, namespace: str
) -> None:
    applied = time.monotonic()
    apply(cluster, namespace, busybox_pod("hello", 'echo "hello from $(id -u) in $(cat /proc/1/comm)"'))
    apply(cluster, namespace, busybox_pod("fails", "echo about to fail >&2; exit 3"))
    done = wait_for(lambda: terminated(cluster, namespace, "hello"), timeout_s=60, what="hello terminated")
    finished_after_s = time.monotonic() - applied
    assert done["exitCode"] == 0
    wait_for(lambda: pod(cluster, namespace, "hello")["status"]["phase"] == "Succeeded", what="Succeeded")
    assert pod(cluster, namespace, "hello")["spec"]["nodeName"] == NAME
    logs = cluster.kubectl("logs", "-n", namespace, "hello").stdout
    assert logs == "hello from 0 in sh\n"
    failed = wait_for(lambda: terminated(cluster, namespace, "fails"), timeout_s=60, what="fails terminated")
    assert failed["exitCode"] == 3
    wait_for(lambda: pod(cluster, namespace, "fails")["status"]["phase"] == "Failed", what="Failed")
    assert cluster.kubectl("logs", "-n", namespace, "fails").stdout == "about to fail\n"
    print(f"pod applied -> seen terminated (test clock): {finished_after_s:.2f} s")


def test_a_running_pod_serves_exec_and_reports_its_start_time(
    cluster: ControlPlane, real_node: RealNode, namespace: str
) -> None:
    started = time.time()
    apply(cluster, namespace, busybox_pod("sleeper", "exec sleep 3600"))
    wait_for(
        lambda: pod(cluster, namespace, "sleeper")["status"].get("phase") == "Running",
        timeout_s=60,
        what="sleeper Running",
    )
    running_after_s = time.time() - started
    out = cluster.kubectl("exec", "-n", namespace, "sleeper", "--", "cat", "/proc/1/cmdline").stdout
    assert out.split("\0")[:2] == ["sleep", "3600"]
    pod_ip = pod(cluster, namespace, "sleeper")["status"]["podIP"]
    assert pod_ip.startswith("127.1.")
    print(f"pod applied -> Running (seen by the test): {running_after_s:.2f} s")


def test_pods_that_do_not_tolerate_the_taint_never_land_on_real_node(
    cluster: ControlPlane, real_node: RealNode, namespace: str
) -> None:
    untolerated = busybox_pod("no-toleration", "true")
    untolerated["spec"]["tolerations"] = []
    apply(cluster, namespace, untolerated)
    plain = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "plain"},
        "spec": {
            "replicas": 12,
            "selector": {"matchLabels": {"app": "plain"}},
            "template": {
                "metadata": {"labels": {"app": "plain"}},
                "spec": {"containers": [{"name": "c", "image": "registry.invalid/plain:1"}]},
            },
        },
    }
    apply(cluster, namespace, plain)

    def all_scheduled() -> list[str] | None:
        pods = cluster.get_json("pods", "-n", namespace, "-l", "app=plain")["items"]
        nodes = [p["spec"].get("nodeName") for p in pods]
        return nodes if len(nodes) == 12 and all(nodes) else None

    nodes = wait_for(all_scheduled, timeout_s=60, what="12 plain pods scheduled")
    assert NAME not in nodes
    assert set(nodes) <= {n.name for n in cluster.nodes}

    def refused() -> bool:
        status = pod(cluster, namespace, "no-toleration")["status"]
        return any(
            c["type"] == "PodScheduled"
            and c.get("reason") == "Unschedulable"
            and "taint" in c.get("message", "")
            for c in status.get("conditions", [])
        )

    wait_for(refused, timeout_s=60, what="the untolerated pod refused for the taint")
    assert "nodeName" not in pod(cluster, namespace, "no-toleration")["spec"]


def _kubelet_get(real_node: RealNode, path: str, token: str | None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{real_node.kubelet_url}{path}", headers=headers)
    try:
        with urllib.request.urlopen(request, context=real_node.kubelet_ssl_context(), timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_kubelet_stats_summary_answers_an_authorised_token_and_refuses_others(
    cluster: ControlPlane, real_node: RealNode, namespace: str
) -> None:
    spinner = busybox_pod("spinner", "while :; do :; done", terminationGracePeriodSeconds=0)
    spinner["spec"]["containers"][0]["resources"] = {"limits": {"cpu": "100m", "memory": "32Mi"}}
    apply(cluster, namespace, spinner)
    cluster.kubectl("create", "serviceaccount", "-n", namespace, "reader")
    cluster.kubectl("create", "serviceaccount", "-n", namespace, "nobody")
    role = f"{namespace}-node-stats"
    cluster.kubectl("create", "clusterrole", role, "--verb=get", "--resource=nodes/stats,nodes/proxy")
    cluster.kubectl(
        "create", "clusterrolebinding", role, f"--clusterrole={role}", f"--serviceaccount={namespace}:reader"
    )
    try:
        reader = cluster.kubectl("create", "token", "-n", namespace, "reader").stdout.strip()
        nobody = cluster.kubectl("create", "token", "-n", namespace, "nobody").stdout.strip()
        assert _kubelet_get(real_node, "/stats/summary", None)[0] == 401
        assert _kubelet_get(real_node, "/stats/summary", nobody)[0] == 403

        def spinner_cpu() -> int | None:
            status, body = _kubelet_get(real_node, "/stats/summary", reader)
            assert status == 200, body
            summary = json.loads(body)
            assert summary["node"]["nodeName"] == NAME
            for entry in summary.get("pods", []):
                ref = entry["podRef"]
                if (ref["namespace"], ref["name"]) == (namespace, "spinner") and entry.get("cpu"):
                    return int(entry["cpu"]["usageCoreNanoSeconds"])
            return None

        first = wait_for(spinner_cpu, timeout_s=60, what="the spinner in /stats/summary")
        later = wait_for(
            lambda: (v := spinner_cpu()) and v > first and v, timeout_s=60, what="its CPU to grow"
        )
        assert later > first
    finally:
        cluster.kubectl("delete", "clusterrolebinding,clusterrole", role, check=False)


def test_pod_resources_list_answers_a_root_client_with_the_running_pods(
    cluster: ControlPlane, real_node: RealNode, namespace: str
) -> None:
    apply(cluster, namespace, busybox_pod("listed", "exec sleep 3600"))
    wait_for(
        lambda: pod(cluster, namespace, "listed")["status"].get("phase") == "Running",
        timeout_s=60,
        what="Running",
    )
    assert os.stat(POD_RESOURCES_SOCKET).st_uid == 0
    with grpc.insecure_channel(f"unix://{POD_RESOURCES_SOCKET}") as channel:
        stub = api_pb2_grpc.PodResourcesListerStub(channel)
        listed = stub.List(api_pb2.ListPodResourcesRequest(), timeout=10)
        names = {(p.namespace, p.name): [c.name for c in p.containers] for p in listed.pod_resources}
        assert names[(namespace, "listed")] == ["main"]
        allocatable = stub.GetAllocatableResources(api_pb2.AllocatableResourcesRequest(), timeout=10)
        assert list(allocatable.devices) == []  # no device plugin on this node


def _host_facts() -> dict[str, Any]:
    """Read by the test itself: mounts and cgroups a node would leave, the kubelet's sysctls."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    ours = [m for m in mounts if m.startswith((str(KUBELET_ROOT), str(RUN_DIR), str(DATA_DIR), "/run/netns"))]
    kubepods = [str(p) for p in Path("/sys/fs/cgroup").glob("*/kubepods")]
    sysctls = {name: Path("/proc/sys", name).read_text().strip() for name in KUBELET_SYSCTLS}
    return {"mounts": ours, "kubepods": kubepods, "sysctls": sysctls}


def test_stopped_real_node_leaves_no_process_mount_cgroup_or_sysctl_behind(
    cluster: ControlPlane, real_node: RealNode, namespace: str
) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"k": "v"}}
    apply(cluster, namespace, secret)
    volumes = [{"name": "s", "secret": {"secretName": "s"}}, {"name": "m", "emptyDir": {"medium": "Memory"}}]
    runner = busybox_pod("mounted", "exec sleep 3600", volumes=volumes)
    runner["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "s", "mountPath": "/s"},
        {"name": "m", "mountPath": "/m"},
    ]
    apply(cluster, namespace, runner)
    wait_for(
        lambda: pod(cluster, namespace, "mounted")["status"].get("phase") == "Running",
        timeout_s=60,
        what="Running",
    )
    while_running = _host_facts()
    assert while_running["mounts"] and while_running["kubepods"]  # the checks below can fail
    assert real_node.baseline is not None
    before = {name: real_node.baseline.sysctls[name].strip() for name in KUBELET_SYSCTLS}
    assert while_running["sysctls"] == KUBELET_SYSCTLS  # what the kubelet sets while it runs

    real_node.stop()
    after = _host_facts()
    assert after == {"mounts": [], "kubepods": [], "sysctls": before}
    assert real_node.leftovers_after_stop == []
    for path in (KUBELET_ROOT, RUN_DIR, DATA_DIR):
        assert not path.exists()

    restarted = time.monotonic()
    real_node.start()  # the rest of the session keeps its node
    print(
        f"real node restarted (Ready) in {time.monotonic() - restarted:.1f} s: "
        f"{json.dumps(real_node.timings_s)}"
    )
    assert real_node.ready()
