"""The operator on the real control plane: children, config updates, problems in status, restarts
without writes, and deletion per buffer.onDelete."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubemeter.api.rendered import GATEWAY_PORT, GatewayConfig

from testbed.controlplane import ControlPlane, wait_for
from testbed.kubelet_endpoint import KubeletEndpoint
from tests.integration.agent.agent_harness import AgentProcess
from tests.integration.agent.agent_harness import meter as agent_meter
from tests.integration.operator.conftest import REPO_ROOT, OperatorProcess, condition, get

pytestmark = pytest.mark.integration

EXAMPLE = REPO_ROOT / "examples" / "gpu-chargeback.yaml"
COLLECTOR = "chargeback"
OWNED_KINDS: tuple[str, ...] = (
    "serviceaccounts",
    "configmaps",
    "services",
    "daemonsets",
    "statefulsets",
    "poddisruptionbudgets",
)


def apply(cluster: ControlPlane, namespace: str, text: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=text)


def apply_example(cluster: ControlPlane, namespace: str) -> None:
    apply(cluster, namespace, Path(EXAMPLE).read_text())


def wait_ready(cluster: ControlPlane, namespace: str, kind: str, name: str, timeout_s: float = 90) -> Any:
    def ready() -> Any:
        obj = get(cluster, "-n", namespace, kind, name)
        return obj if condition(obj, "Ready").get("status") == "True" else None

    return wait_for(ready, timeout_s=timeout_s, what=f"{kind}/{name} Ready in {namespace}")


def wait_condition(
    cluster: ControlPlane, namespace: str, kind: str, name: str, condition_type: str, reason: str
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        found = condition(get(cluster, "-n", namespace, kind, name), condition_type)
        return found if found.get("reason") == reason else None

    result: dict[str, Any] = wait_for(reached, timeout_s=60, what=f"{kind}/{name} {condition_type}={reason}")
    return result


def agent_config(cluster: ControlPlane, namespace: str) -> dict[str, Any]:
    config_map = get(cluster, "-n", namespace, "configmap", f"{COLLECTOR}-config")
    loaded: dict[str, Any] = yaml.safe_load(config_map["data"]["agent.yaml"])
    return loaded


def resource_versions(cluster: ControlPlane, namespace: str) -> dict[str, str]:
    versions: dict[str, str] = {}
    for kind in (*OWNED_KINDS, "collectors", "meters", "pipelines"):
        listed = json.loads(cluster.kubectl("get", kind, "-n", namespace, "-o", "json").stdout)
        for item in listed["items"]:
            versions[f"{kind}/{item['metadata']['name']}"] = item["metadata"]["resourceVersion"]
    binding = get(cluster, "clusterrolebinding", f"kubemeter-agent-{namespace}-{COLLECTOR}")
    versions["clusterrolebinding"] = binding["metadata"]["resourceVersion"]
    return versions


def test_example_children_exist_with_owner_labels_rbac_mounts_and_config(
    cluster: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    apply_example(cluster, namespace)
    collector = wait_ready(cluster, namespace, "collector", COLLECTOR)
    uid = collector["metadata"]["uid"]
    assert collector["status"]["observedGeneration"] == collector["metadata"]["generation"]
    assert collector["status"]["agents"]["desired"] == len(cluster.nodes)
    assert collector["status"]["agents"]["ready"] == collector["status"]["agents"]["desired"]
    assert collector["status"]["meters"] == 3
    assert condition(collector, "Degraded")["status"] == "False"

    for kind in OWNED_KINDS:
        items = json.loads(
            cluster.kubectl("get", kind, "-n", namespace, "-l", "kubemeter.io/collector", "-o", "json").stdout
        )
        assert items["items"], f"no {kind}"
        for item in items["items"]:
            (owner,) = item["metadata"]["ownerReferences"]
            assert owner["uid"] == uid and owner["kind"] == "Collector" and owner["controller"] is True
            assert item["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubemeter-operator"

    binding = get(cluster, "clusterrolebinding", f"kubemeter-agent-{namespace}-{COLLECTOR}")
    assert binding["roleRef"]["name"] == "kubemeter-agent"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": f"{COLLECTOR}-agent", "namespace": namespace}
    ]
    can_list_pods = cluster.kubectl(
        "auth",
        "can-i",
        "list",
        "pods",
        f"--as=system:serviceaccount:{namespace}:{COLLECTOR}-agent",
        check=False,
    )
    assert can_list_pods.stdout.strip() == "yes"
    can_read_secrets = cluster.kubectl(
        "auth",
        "can-i",
        "get",
        "secrets",
        "-n",
        namespace,
        f"--as=system:serviceaccount:{namespace}:{COLLECTOR}-agent",
        check=False,
    )
    assert can_read_secrets.stdout.strip() == "no"

    config = agent_config(cluster, namespace)
    assert config["cluster"] == "it" and config["namespace"] == namespace
    assert [meter["name"] for meter in config["meters"]] == [
        "cpu-core-seconds",
        "gpu-seconds",
        "memory-byte-seconds",
    ]
    assert config["meters"][1]["processors"][-1] == {"drop": ["team"]}
    daemonset = get(cluster, "-n", namespace, "daemonset", f"{COLLECTOR}-agent")
    mounts = {
        m["name"]: m["mountPath"]
        for m in daemonset["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    }
    assert mounts["config"] == "/etc/kubemeter/config" and mounts["state"] == "/var/lib/kubemeter"
    statefulset = get(cluster, "-n", namespace, "statefulset", f"{COLLECTOR}-gateway")
    assert statefulset["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Retain"
    wait_for(
        lambda: (
            len(json.loads(cluster.kubectl("get", "pvc", "-n", namespace, "-o", "json").stdout)["items"]) == 2
        ),
        what="2 gateway PVCs",
    )
    for meter in ("gpu-seconds", "cpu-core-seconds", "memory-byte-seconds"):
        status = wait_ready(cluster, namespace, "meter", meter)["status"]
        assert status["collectors"] == [COLLECTOR]
    assert wait_ready(cluster, namespace, "pipeline", "compute")["status"]["meterCount"] == 3


def test_a_meter_edit_reaches_the_config_map_without_touching_the_agents(
    cluster: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    apply_example(cluster, namespace)
    wait_ready(cluster, namespace, "collector", COLLECTOR)
    daemonset_before = get(cluster, "-n", namespace, "daemonset", f"{COLLECTOR}-agent")["metadata"][
        "generation"
    ]
    cluster.kubectl(
        "patch",
        "-n",
        namespace,
        "meter",
        "gpu-seconds",
        "--type=merge",
        "-p",
        '{"spec":{"windowSeconds":300}}',
    )

    def edited() -> bool:
        meters = {meter["name"]: meter for meter in agent_config(cluster, namespace)["meters"]}
        return bool(meters["gpu-seconds"]["spec"]["windowSeconds"] == 300)

    wait_for(edited, timeout_s=30, what="windowSeconds 300 in agent.yaml")
    daemonset_after = get(cluster, "-n", namespace, "daemonset", f"{COLLECTOR}-agent")["metadata"][
        "generation"
    ]
    assert daemonset_after == daemonset_before

    # unbinding a Meter (label change) removes it from the rendered config
    cluster.kubectl(
        "label",
        "-n",
        namespace,
        "meter",
        "cpu-core-seconds",
        "billing.kubemeter.io/plan=other",
        "--overwrite",
    )
    wait_for(
        lambda: "cpu-core-seconds" not in [m["name"] for m in agent_config(cluster, namespace)["meters"]],
        timeout_s=30,
        what="cpu-core-seconds unbound",
    )
    wait_condition(cluster, namespace, "meter", "cpu-core-seconds", "Ready", "NotBound")


def test_operator_restart_converges_without_writes(
    cluster: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    apply_example(cluster, namespace)
    wait_ready(cluster, namespace, "collector", COLLECTOR)
    wait_ready(cluster, namespace, "pipeline", "compute")
    # settled: a resync (refresh) pass wrote nothing
    marker = f"namespace {namespace} reconciled: 0 child writes (refresh=True)"
    start = len(operator.log_text())
    wait_for(lambda: marker in operator.log_text()[start:], timeout_s=30, what="a quiet resync")
    before = resource_versions(cluster, namespace)

    operator.restart()
    start = 0 if marker not in operator.log_text() else len(operator.log_text())
    wait_for(
        lambda: f"namespace {namespace} reconciled:" in operator.log_text()[start:],
        timeout_s=60,
        what="reconcile after restart",
    )
    wait_for(lambda: marker in operator.log_text()[start:], timeout_s=30, what="a quiet resync after restart")
    assert resource_versions(cluster, namespace) == before
    assert f"namespace {namespace} reconciled: 0 child writes" in operator.log_text()[start:]


EDITOR_SCRIPT = """\
import json, sys, yaml
path = sys.argv[1]
obj = yaml.safe_load(open(path))
if obj["kind"] == "DaemonSet":
    obj["spec"]["template"]["spec"]["containers"][0]["image"] = "edited.invalid/agent:by-hand"
else:
    obj["data"]["agent.yaml"] = "edited: by hand\\n"
yaml.safe_dump(obj, open(path, "w"))
seen = {"kind": obj["kind"], "annotations": obj["metadata"].get("annotations") or {}}
open(path.rsplit("/", 1)[0] + "/../seen-" + obj["kind"], "w").write(json.dumps(seen))
"""


def test_a_kubectl_edit_of_a_child_is_reverted_at_the_next_resync(
    cluster: ControlPlane,
    operator: OperatorProcess,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An edit leaves the applied-hash annotation as it was; the resync must not trust it."""
    apply_example(cluster, namespace)
    wait_ready(cluster, namespace, "collector", COLLECTOR)
    quiet = f"namespace {namespace} reconciled: 0 child writes (refresh=True)"
    start = len(operator.log_text())
    wait_for(lambda: quiet in operator.log_text()[start:], timeout_s=30, what="a quiet resync")
    daemonset_before = get(cluster, "-n", namespace, "daemonset", f"{COLLECTOR}-agent")
    image = daemonset_before["spec"]["template"]["spec"]["containers"][0]["image"]
    config_before = get(cluster, "-n", namespace, "configmap", f"{COLLECTOR}-config")
    hash_key = "kubemeter.io/applied-hash"

    editor = tmp_path / "editor.py"
    editor.write_text(EDITOR_SCRIPT)
    edits = tmp_path / "edits"
    edits.mkdir()
    monkeypatch.setenv("KUBE_EDITOR", f"{sys.executable} {editor}")
    monkeypatch.setenv("TMPDIR", str(edits))  # kubectl writes the file it opens there
    for kind, name in (("daemonset", f"{COLLECTOR}-agent"), ("configmap", f"{COLLECTOR}-config")):
        answer = cluster.kubectl("edit", "-n", namespace, kind, name).stdout
        assert "edited" in answer, answer
    # What kubectl edit read and wrote back: the hash annotation untouched.
    for kind, before in (("DaemonSet", daemonset_before), ("ConfigMap", config_before)):
        seen = json.loads((tmp_path / f"seen-{kind}").read_text())
        assert seen["annotations"][hash_key] == before["metadata"]["annotations"][hash_key]

    def reverted() -> bool:
        daemonset = get(cluster, "-n", namespace, "daemonset", f"{COLLECTOR}-agent")
        config = get(cluster, "-n", namespace, "configmap", f"{COLLECTOR}-config")
        return (
            daemonset["spec"]["template"]["spec"]["containers"][0]["image"] == image
            # two new generations: the edit, then the operator's apply
            and daemonset["metadata"]["generation"] >= daemonset_before["metadata"]["generation"] + 2
            and config["data"]["agent.yaml"] == config_before["data"]["agent.yaml"]
            and config["metadata"]["resourceVersion"] != config_before["metadata"]["resourceVersion"]
        )

    wait_for(reverted, timeout_s=30, what="the resync to revert both edits")
    start = len(operator.log_text())
    wait_for(lambda: quiet in operator.log_text()[start:], timeout_s=30, what="a quiet resync after it")


def manifests(*objects: tuple[str, str, dict[str, Any]]) -> str:
    return yaml.safe_dump_all(
        {"apiVersion": "kubemeter.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}
        for kind, name, spec in objects
    )


OUTPUT = {"type": "openmeter", "url": "http://om"}
PLAIN_COLLECTOR = ("Collector", "c", {"output": OUTPUT})
CPU_METER: dict[str, Any] = {"eventType": "e", "unit": "u", "source": {"allocation": {"resource": "cpu"}}}

LONG_LIST = "[" + ",".join(["1"] * 200) + "]"
PROBLEMS: list[tuple[str, str, str, str, str, str]] = [
    # (case, manifests, kind, name, reason, message fragment)
    (
        "missing-secret",
        manifests(
            (
                "Collector",
                "c",
                {"output": {**OUTPUT, "credentialsSecretRef": {"name": "nope", "key": "token"}}},
            )
        ),
        "collector",
        "c",
        "SecretNotFound",
        'names Secret "nope", which does not exist in namespace',
    ),
    (
        "unknown-collector",
        manifests(("Pipeline", "p", {"collectorRef": "ghost", "meters": ["m"]})),
        "pipeline",
        "p",
        "CollectorNotFound",
        'spec.collectorRef names Collector "ghost", which does not exist',
    ),
    (
        "unknown-meter",
        manifests(PLAIN_COLLECTOR, ("Pipeline", "p", {"collectorRef": "c", "meters": ["ghost"]})),
        "pipeline",
        "p",
        "MeterNotFound",
        'spec.meters names Meter "ghost", which does not exist',
    ),
    (
        "cel-does-not-compile",
        manifests(("Meter", "m", {**CPU_METER, "subject": {"expression": "namespace.metadata.name +"}})),
        "meter",
        "m",
        "InvalidExpression",
        "spec.subject.expression does not compile",
    ),
    (
        "cel-unknown-variable",
        manifests(
            PLAIN_COLLECTOR,
            ("Meter", "m", CPU_METER),
            (
                "Pipeline",
                "p",
                {"collectorRef": "c", "meters": ["m"], "processors": [{"filter": "evnt.data.value > 0.0"}]},
            ),
        ),
        "pipeline",
        "p",
        "InvalidExpression",
        "uses unknown name 'evnt'; it can use only event",
    ),
    (
        # Issue #14: the Meter's agents would send the Collector's billing API key to the Meter's URL.
        "meter-reads-the-billing-key",
        manifests(
            (
                "Collector",
                "c",
                {"output": {**OUTPUT, "credentialsSecretRef": {"name": "om", "key": "token"}}},
            ),
            (
                "Meter",
                "m",
                {
                    **CPU_METER,
                    "source": {
                        "prometheus": {
                            "url": "https://attacker.example",
                            "query": "up",
                            "bearerTokenSecretRef": {"name": "om", "key": "token"},
                        }
                    },
                },
            ),
            ("Pipeline", "p", {"collectorRef": "c", "meters": ["m"]}),
        ),
        "meter",
        "m",
        "ForbiddenSecret",
        'names Secret "om", which holds Collector "c"\'s billing API key',
    ),
    (
        # Two comprehensions pass the API server's count; 200 x 200 iterations do not pass the budget.
        "cel-over-the-step-budget",
        manifests(
            (
                "Meter",
                "m",
                {**CPU_METER, "dimensions": {"x": f"{LONG_LIST}.all(a, {LONG_LIST}.all(b, a == b))"}},
            )
        ),
        "meter",
        "m",
        "InvalidExpression",
        "spec.dimensions.x is over the CEL cost budget: stopped after 10000 evaluation steps",
    ),
]


@pytest.mark.parametrize(
    ("case", "manifest", "kind", "name", "reason", "message"), PROBLEMS, ids=[case[0] for case in PROBLEMS]
)
def test_what_only_the_operator_knows_is_degraded_with_an_event(
    cluster: ControlPlane,
    operator: OperatorProcess,
    namespace: str,
    case: str,
    manifest: str,
    kind: str,
    name: str,
    reason: str,
    message: str,
) -> None:
    apply(cluster, namespace, manifest)
    degraded = wait_condition(cluster, namespace, kind, name, "Degraded", reason)
    assert degraded["status"] == "True"
    assert message in degraded["message"], degraded["message"]

    def warned() -> bool:
        events = json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout)["items"]
        return any(
            e["reason"] == reason and e["type"] == "Warning" and message in e["message"] for e in events
        )

    wait_for(warned, timeout_s=30, what=f"a Warning Event {reason}")
    assert operator.healthy()


def test_a_refused_meter_secret_is_not_mounted_into_the_agents(
    cluster: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    case = next(problem for problem in PROBLEMS if problem[0] == "meter-reads-the-billing-key")
    apply(cluster, namespace, case[1])
    wait_condition(cluster, namespace, "meter", "m", "Degraded", "ForbiddenSecret")
    daemonset = wait_for(
        lambda: get(cluster, "-n", namespace, "daemonset", "c-agent"), timeout_s=60, what="the agents"
    )
    volumes = daemonset["spec"]["template"]["spec"]["volumes"]
    mounted = {v["secret"]["secretName"] for v in volumes if "secret" in v}
    assert mounted == {"c-ingest-token"}, "only the ingest token; never the billing key"
    config = yaml.safe_load(get(cluster, "-n", namespace, "configmap", "c-config")["data"]["agent.yaml"])
    assert config["meters"] == []


def test_the_generated_ingest_token_is_kept_across_resyncs(
    cluster: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, manifests(PLAIN_COLLECTOR))
    secret = wait_for(
        lambda: get(cluster, "-n", namespace, "secret", "c-ingest-token"), timeout_s=60, what="the token"
    )
    collector = get(cluster, "-n", namespace, "collector", "c")
    assert secret["metadata"]["ownerReferences"][0]["uid"] == collector["metadata"]["uid"]
    resyncs = operator.log_text().count(f"namespace {namespace} reconciled")
    wait_for(
        lambda: operator.log_text().count(f"namespace {namespace} reconciled") >= resyncs + 2,
        timeout_s=60,
        what="two more reconciliations (resync every 5 s)",
    )
    again = get(cluster, "-n", namespace, "secret", "c-ingest-token")
    assert again["metadata"]["resourceVersion"] == secret["metadata"]["resourceVersion"]
    assert again["data"] == secret["data"]


def test_a_missing_secret_recovers_when_created(
    cluster: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, PROBLEMS[0][1])
    wait_condition(cluster, namespace, "collector", "c", "Degraded", "SecretNotFound")
    cluster.kubectl("create", "secret", "generic", "nope", "-n", namespace, "--from-literal=token=t")
    wait_condition(cluster, namespace, "collector", "c", "Degraded", "AsExpected")


def test_deleting_a_retain_collector_keeps_its_volumes(
    cluster: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    apply_example(cluster, namespace)
    wait_ready(cluster, namespace, "collector", COLLECTOR)
    wait_for(
        lambda: (
            len(json.loads(cluster.kubectl("get", "pvc", "-n", namespace, "-o", "json").stdout)["items"]) == 2
        ),
        what="2 gateway PVCs",
    )
    cluster.kubectl("delete", "-n", namespace, "collector", COLLECTOR, "--timeout=60s")
    wait_for(
        lambda: get(cluster, "-n", namespace, "daemonset", f"{COLLECTOR}-agent") is None,
        what="agents collected",
    )
    wait_for(
        lambda: get(cluster, "-n", namespace, "configmap", f"{COLLECTOR}-config") is None,
        what="config collected",
    )
    assert get(cluster, "clusterrolebinding", f"kubemeter-agent-{namespace}-{COLLECTOR}") is None
    pvcs = json.loads(cluster.kubectl("get", "pvc", "-n", namespace, "-o", "json").stdout)["items"]
    assert sorted(p["metadata"]["name"] for p in pvcs) == [
        f"data-{COLLECTOR}-gateway-0",
        f"data-{COLLECTOR}-gateway-1",
    ]


def test_a_drain_collector_waits_for_its_buffer_and_says_how_to_skip(
    cluster: ControlPlane, operator: OperatorProcess, namespace: str
) -> None:
    text = Path(EXAMPLE).read_text().replace("onDelete: Retain", "onDelete: Drain")
    apply(cluster, namespace, text)
    wait_ready(cluster, namespace, "collector", COLLECTOR)
    cluster.kubectl("delete", "-n", namespace, "collector", COLLECTOR, "--wait=false")
    draining = wait_condition(cluster, namespace, "collector", COLLECTOR, "Ready", "Draining")
    assert "set spec.buffer.onDelete: Retain" in draining["message"]
    # the agents stopped first, so they flush into the gateway, which is still there
    wait_for(
        lambda: get(cluster, "-n", namespace, "daemonset", f"{COLLECTOR}-agent") is None,
        what="agents stopped",
    )
    assert get(cluster, "-n", namespace, "statefulset", f"{COLLECTOR}-gateway") is not None
    cluster.kubectl(
        "patch",
        "-n",
        namespace,
        "collector",
        COLLECTOR,
        "--type=merge",
        "-p",
        '{"spec":{"buffer":{"onDelete":"Retain"}}}',
    )
    wait_for(
        lambda: get(cluster, "-n", namespace, "collector", COLLECTOR) is None,
        timeout_s=60,
        what="collector gone",
    )
    pvcs = json.loads(cluster.kubectl("get", "pvc", "-n", namespace, "-o", "json").stdout)["items"]
    assert len(pvcs) == 2  # switched to Retain: kept


def test_an_agents_source_fault_shows_in_the_collector_status_and_clears_when_it_clears(
    cluster: ControlPlane, operator: OperatorProcess, namespace: str, tmp_path: Path
) -> None:
    """The agent pushes its source faults to its gateway; the operator reads them from the gateway
    pod's /status (one request per replica, never one per agent). Real agent, gateway and operator
    processes; the gateway listens where the API server says its hostNetwork pod is."""
    node = next(n for n in cluster.nodes if "nvidia.com/gpu" not in n.capacity)
    on_node = {"node.kubernetes.io/instance-type": node.labels["node.kubernetes.io/instance-type"]}
    spec = {
        "output": {"type": "cloudevents", "url": "http://127.0.0.1:1"},
        "hostNetwork": True,
        "nodeSelector": on_node,
        "gateway": {"replicas": 1, "nodeSelector": on_node},
    }
    apply(cluster, namespace, manifests(("Collector", "c", spec)))
    wait_ready(cluster, namespace, "collector", "c")
    (gateway_pod,) = cluster.get_json("pods", "-n", namespace, "-l", "app.kubernetes.io/component=gateway")[
        "items"
    ]
    pod_ip = gateway_pod["status"]["podIP"]
    assert pod_ip == node.internal_ip  # hostNetwork: the pod has its node's address

    secret = get(cluster, "-n", namespace, "secret", "c-ingest-token")
    token_file = tmp_path / "token"
    token_file.write_bytes(base64.b64decode(secret["data"]["token"]))
    rendered = GatewayConfig.from_yaml(
        get(cluster, "-n", namespace, "configmap", "c-config")["data"]["gateway.yaml"]
    )
    gateway_config = rendered.model_copy(
        update={
            "data_dir": str(tmp_path / "gateway"),
            "listen_address": f"{pod_ip}:{GATEWAY_PORT}",
            "ingest_token_file": str(token_file),
            "agent_report_ttl_seconds": 4.0,  # complete 2 s after its start, not 90 s
        }
    )
    (tmp_path / "gateway.yaml").write_text(gateway_config.to_yaml())
    gateway_log = (tmp_path / "gateway.log").open("ab")
    gateway = subprocess.Popen(
        [sys.executable, "-m", "kubemeter_cli", "gateway", "--config", str(tmp_path / "gateway.yaml")],
        cwd=REPO_ROOT,
        stdout=gateway_log,
        stderr=subprocess.STDOUT,
    )

    healthy = threading.Event()  # the stand-in kubelet answers 503 until it is set

    def kubelet_answer(path: str, authorization: str) -> tuple[int, str]:
        if not healthy.is_set():
            return 503, "kubelet overloaded"
        return 200, json.dumps(
            {"node": {"nodeName": node.name, "startTime": "2024-01-01T00:00:00Z"}, "pods": []}
        )

    kubelet = KubeletEndpoint(
        node.internal_ip, cluster.kubelet_ports[node.name], tmp_path / "pki", kubelet_answer
    )
    agent = AgentProcess(
        tmp_path / "agent",
        node.name,
        cluster.kubeconfig,
        [agent_meter("cpu-core-seconds", "m-kcpu", namespace, {"kubeletUsage": {"metric": "cpu"}})],
        env={"KUBEMETER_KUBELET_CA_FILE": str(kubelet.cert)},
    )
    config = yaml.safe_load(agent.config_path.read_text())
    config |= {
        "gatewayUrl": f"http://{pod_ip}:{GATEWAY_PORT}",
        "ingestTokenFile": str(token_file),
        "faultReportRefreshSeconds": 1,
    }
    agent.config_path.write_text(yaml.safe_dump(config))
    try:
        agent.start()

        def source_faults() -> list[dict[str, str]]:
            status = get(cluster, "-n", namespace, "collector", "c").get("status") or {}
            return list(status.get("sourceFaults") or [])

        faults = wait_for(
            source_faults, timeout_s=60, what="the agent's source fault in the Collector status"
        )
        assert [(f["meter"], f["node"]) for f in faults] == [("kubemeter-system/cpu-core-seconds", node.name)]
        assert "503" in faults[0]["reason"]
        degraded = condition(get(cluster, "-n", namespace, "collector", "c"), "Degraded")
        assert degraded["reason"] == "SourceFault"
        assert f'Meter "kubemeter-system/cpu-core-seconds" on node {node.name}' in degraded["message"]
        assert condition(get(cluster, "-n", namespace, "collector", "c"), "Ready")["status"] == "True"

        healthy.set()
        wait_for(lambda: source_faults() == [], timeout_s=60, what="the cleared fault to leave the status")
        wait_condition(cluster, namespace, "collector", "c", "Degraded", "AsExpected")
    finally:
        agent.stop()
        kubelet.stop()
        gateway.terminate()
        gateway.wait(timeout=30)
        gateway_log.close()
