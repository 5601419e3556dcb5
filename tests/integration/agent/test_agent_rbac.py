"""The agent and the gateway on tokens of the ServiceAccounts and RBAC the operator renders for them.

The operator's builders render a Collector's ServiceAccounts, the shared ``kubemeter-agent``
ClusterRole and the agents' ClusterRoleBinding; they are applied to the local control plane as the
operator applies them, a token is minted for each ServiceAccount with the TokenRequest API
(``kubectl create token``), and the real processes run on those tokens alone:

- ``kubemeter agent`` meters a pod of its node (allocation from the pod watch, usage from the
  kubelet) through its spool into the gateway. Its kubelet is a stand-in that authorises like the real
  one: a TokenReview of the bearer token, then a SubjectAccessReview for ``get nodes/stats`` (the
  kubelet maps ``/stats/*`` to ``nodes/stats``, ``/logs/*`` to ``nodes/log`` and most else to
  ``nodes/proxy``), so the API server's RBAC decides, as it does for a real kubelet.
- ``kubemeter gateway`` buffers and delivers those events to ``kubemeter sink``. It calls no
  Kubernetes API: its kubeconfig and in-cluster address point at a listener that fails the test if
  anything connects.

What RBAC cannot narrow, and so is documented rather than tested as refused: the agent's pod LIST
and WATCH carry ``fieldSelector=spec.nodeName=<its node>``, but RBAC grants ``list pods``
cluster-wide or not at all; ``get nodes`` cannot be limited to the agent's own Node.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml
from kubemeter.api.collector import CollectorSpec
from kubemeter.api.meter import MeterSpec
from kubemeter.api.rendered import SECRETS_DIR, AgentConfig, GatewayConfig, ResolvedMeter
from kubemeter_operator.builders import build_children
from kubemeter_operator.builders.common import FIELD_MANAGER, CollectorRef
from kubemeter_operator.builders.configmap import get_generated_token_secret
from kubemeter_operator.builders.rbac import agent_cluster_role_rules, get_agent_cluster_role
from kubemeter_operator.settings import OperatorSettings

from testbed.controlplane import REPO_ROOT, ControlPlane, FakeNode, free_port, wait_for
from testbed.kubelet_endpoint import KubeletEndpoint

COLLECTOR = "metered"
WINDOW_S = 10
HALF_A_CORE_NS_PER_MS = 500_000
RBAC_KINDS = {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}


class Access(NamedTuple):
    verb: str
    resource: str
    subresource: str = ""
    group: str = ""


# Every request the agent makes, and where: the informers' LIST+WATCH (pods with the node's field
# selector, namespaces), the node refresher's GET of its Node, and the kubelet's GET /stats/summary.
AGENT_USES = [
    Access("list", "pods"),
    Access("watch", "pods"),
    Access("list", "namespaces"),
    Access("watch", "namespaces"),
    Access("get", "nodes"),
    Access("get", "nodes", "stats"),
    # dra and idle meters: the node's ResourceSlices, and each claim of its pods by name
    Access("list", "resourceslices", group="resource.k8s.io"),
    Access("watch", "resourceslices", group="resource.k8s.io"),
    Access("get", "resourceclaims", group="resource.k8s.io"),
]
# Requests a careless role would allow; the agent never makes them.
AGENT_MUST_NOT = [
    Access("get", "pods"),
    Access("get", "pods", "log"),
    Access("create", "pods", "exec"),
    Access("patch", "pods"),
    Access("delete", "pods"),
    Access("get", "secrets"),
    Access("list", "secrets"),
    Access("get", "configmaps"),
    Access("list", "nodes"),
    Access("patch", "nodes"),
    Access("get", "nodes", "proxy"),
    Access("get", "nodes", "log"),
    Access("create", "events"),
    Access("create", "events", group="events.k8s.io"),
    Access("create", "serviceaccounts", "token"),
    Access("list", "collectors", group="kubemeter.io"),
    Access("list", "resourceclaims", group="resource.k8s.io"),
    Access("patch", "resourceclaims", group="resource.k8s.io"),
]


def atoms(rules: list[dict[str, Any]]) -> set[tuple[str, str, str, str]]:
    """(group, resource[/subresource], verb, resourceName) for every combination a rule allows."""
    return {
        (group, resource, verb, name)
        for rule in rules
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
        for name in rule.get("resourceNames") or [""]
    }


def uses_as_atoms(uses: list[Access]) -> set[tuple[str, str, str, str]]:
    return {
        (a.group, f"{a.resource}/{a.subresource}" if a.subresource else a.resource, a.verb, "") for a in uses
    }


# ---- what the operator renders -----------------------------------------------------------------


def collector_spec(sink_url: str) -> CollectorSpec:
    return CollectorSpec.model_validate(
        {
            "output": {
                "type": "openmeter",
                "url": sink_url,
                "batch": {"maxDelaySeconds": 0.2},
                "retry": {"initialBackoffSeconds": 0.1, "maxBackoffSeconds": 1},
            },
            "agent": {"intervalSeconds": 1},
            "buffer": {"size": "1Gi"},
            "gateway": {"replicas": 1},
        }
    )


def resolved_meters(namespace: str) -> list[ResolvedMeter]:
    def meter(name: str, source: dict[str, Any]) -> ResolvedMeter:
        spec = {
            "eventType": name,
            "unit": "core-seconds",
            "windowSeconds": WINDOW_S,
            "source": source,
            "pods": {"namespaces": [namespace]},
        }
        return ResolvedMeter(
            name=name,
            namespace=namespace,
            uid=f"uid-{name}",
            pipeline="p",
            spec=MeterSpec.model_validate(spec),
        )

    return [
        meter("cpu-allocated", {"allocation": {"resource": "cpu", "basis": "requests"}}),
        meter("cpu-used", {"kubeletUsage": {"metric": "cpu"}}),
        # watches the node's ResourceSlices on the agent's token (a 403 would show in its log)
        meter("gpu-dra", {"dra": {"driver": "gpu.nvidia.com"}}),
    ]


def render(namespace: str, sink_url: str) -> list[dict[str, Any]]:
    ref = CollectorRef(namespace=namespace, name=COLLECTOR, uid=str(uuid.uuid4()))
    settings = OperatorSettings(cluster_name="rbac-it", image="kubemeter:test")
    return build_children(ref, collector_spec(sink_url), resolved_meters(namespace), settings)


def child(children: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(c for c in children if c["kind"] == kind and c["metadata"]["name"] == name)


def test_the_agent_role_is_exactly_the_requests_the_agent_makes_and_the_gateway_has_none() -> None:
    assert atoms(agent_cluster_role_rules()) == uses_as_atoms(AGENT_USES)
    children = render("billing", "http://sink")
    agent_sa, gateway_sa = f"{COLLECTOR}-agent", f"{COLLECTOR}-gateway"
    bound = [
        subject["name"] for c in children if c["kind"] in RBAC_KINDS for subject in c.get("subjects") or []
    ]
    assert bound == [agent_sa], "only the agents' ServiceAccount is bound to anything"
    assert child(children, "ServiceAccount", gateway_sa)["automountServiceAccountToken"] is False
    gateway_pod = child(children, "StatefulSet", gateway_sa)["spec"]["template"]["spec"]
    assert gateway_pod["serviceAccountName"] == gateway_sa
    assert gateway_pod["automountServiceAccountToken"] is False
    agent_pod = child(children, "DaemonSet", agent_sa)["spec"]["template"]["spec"]
    assert agent_pod["serviceAccountName"] == agent_sa


# ---- the parts that run ------------------------------------------------------------------------


class Decision(NamedTuple):
    path: str
    user: str
    subresource: str
    allowed: bool


def kubelet_subresource(path: str) -> str:
    """How the kubelet names a request for its SubjectAccessReview (pkg/kubelet/server/auth.go)."""
    for prefix, subresource in (
        ("/stats", "stats"),
        ("/metrics", "metrics"),
        ("/logs", "log"),
        ("/spec", "spec"),
    ):
        if path == prefix or path.startswith(prefix + "/") or path.startswith(prefix + "?"):
            return subresource
    return "proxy"


class AuthorizingKubelet:
    """A kubelet stand-in at the node's advertised address: it authenticates the bearer token with a
    TokenReview and authorises ``get nodes/<subresource>`` with a SubjectAccessReview, as the real
    kubelet does (webhook authn/authz), then serves a pod's CPU counter at half a core."""

    def __init__(self, cluster: ControlPlane, node: FakeNode, pod: dict[str, Any], certdir: Path) -> None:
        self.cluster = cluster
        self.node = node
        self.pod = pod
        self.decisions: list[Decision] = []
        self.t0_ms = time.time_ns() // 1_000_000
        port = cluster.kubelet_ports[node.name]
        self.endpoint = KubeletEndpoint(node.internal_ip, port, certdir, self.answer)
        self.cert = self.endpoint.cert

    @property
    def url(self) -> str:
        return f"https://{self.node.internal_ip}:{self.cluster.kubelet_ports[self.node.name]}"

    def _review(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.cluster.api_url}{path}",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.cluster.token}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10, context=self.cluster.ssl_context()) as response:
            status: dict[str, Any] = json.load(response)["status"]
            return status

    def answer(self, path: str, authorization: str) -> tuple[int, str]:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return 401, '{"message": "Unauthorized"}'
        review = self._review(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}},
        )
        if not review.get("authenticated"):
            return 401, '{"message": "Unauthorized"}'
        user = review["user"]
        subresource = kubelet_subresource(path)
        attributes = {"verb": "get", "group": "", "version": "v1", "resource": "nodes"}
        access = self._review(
            "/apis/authorization.k8s.io/v1/subjectaccessreviews",
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {
                    "user": user.get("username"),
                    "uid": user.get("uid"),
                    "groups": user.get("groups") or [],
                    "extra": user.get("extra") or {},
                    "resourceAttributes": {**attributes, "subresource": subresource, "name": self.node.name},
                },
            },
        )
        allowed = bool(access.get("allowed"))
        self.decisions.append(Decision(path, str(user.get("username")), subresource, allowed))
        if not allowed:
            who = user.get("username")
            return 403, json.dumps(
                {"message": f"Forbidden (user={who}, verb=get, resource=nodes, subresource={subresource})"}
            )
        if subresource != "stats":
            return 404, "{}"
        now_ms = time.time_ns() // 1_000_000
        meta = self.pod["metadata"]
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now_ms / 1000))
        start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.t0_ms / 1000))
        summary = {
            "node": {"nodeName": self.node.name, "startTime": start},
            "pods": [
                {
                    "podRef": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
                    "startTime": start,
                    "cpu": {
                        "time": stamp,
                        "usageNanoCores": 500_000_000,
                        "usageCoreNanoSeconds": (now_ms - self.t0_ms) * HALF_A_CORE_NS_PER_MS,
                    },
                    "memory": {"time": stamp, "workingSetBytes": 2**20, "usageBytes": 2**20},
                    "containers": [],
                }
            ],
        }
        return 200, json.dumps(summary)

    def get(self, path: str, token: str) -> int:
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {token}"})
        context = ssl.create_default_context(cafile=str(self.cert))
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            return int(error.code)

    def stop(self) -> None:
        self.endpoint.stop()


class NoApiListener:
    """Where the gateway's kubeconfig and in-cluster address point: any connection is a failure."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()

    def stop(self) -> None:
        self.sock.close()


class Process:
    """One ``kubemeter <role>`` child process with its log in a file."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kubemeter_cli", *args],
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def http_get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return str(response.read().decode())
    except OSError:
        return None


def http_json(url: str) -> Any:
    body = http_get(url)
    return json.loads(body) if body else None


def apply_as_the_operator(cluster: ControlPlane, manifests: list[dict[str, Any]]) -> None:
    # Owner references name a Collector that does not exist here; the garbage collector would
    # delete the children at once. Everything else is applied exactly as rendered.
    for manifest in manifests:
        manifest = json.loads(json.dumps(manifest))
        manifest["metadata"].pop("ownerReferences", None)
        cluster.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            f"--field-manager={FIELD_MANAGER}",
            "-f",
            "-",
            input=json.dumps(manifest),
        )


def mint_token(cluster: ControlPlane, namespace: str, service_account: str, path: Path) -> tuple[str, Path]:
    """A TokenRequest for the ServiceAccount, in a kubeconfig of its own."""
    token = cluster.kubectl(
        "create", "token", service_account, "-n", namespace, "--duration=1h"
    ).stdout.strip()
    path.write_text(
        cluster.kubeconfig_text(token=token, user=f"system:serviceaccount:{namespace}:{service_account}")
    )
    return token, path


def mount_generated_token(cluster: ControlPlane, namespace: str, directory: Path) -> Path:
    """The operator's generated ingest token Secret, created as the operator creates it, then read
    back from the API server into a file, as the kubelet mounts it."""
    ref = CollectorRef(namespace=namespace, name=COLLECTOR, uid=str(uuid.uuid4()))
    secret = get_generated_token_secret(ref)
    secret["metadata"].pop("ownerReferences")  # no Collector here: the garbage collector would take it
    cluster.kubectl("create", "-f", "-", input=json.dumps(secret))
    stored = cluster.get_json("secret", secret["metadata"]["name"], "-n", namespace)
    path = directory / "token"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(stored["data"]["token"]))
    return path


def ingest_status(gateway_url: str, token: str | None) -> int:
    headers = {"Content-Type": "application/cloudevents-batch+json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        f"{gateway_url}/api/v1/events", data=b"[]", headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def rules_review(cluster: ControlPlane, token: str, namespace: str) -> set[tuple[str, str, str, str]]:
    """What the token may do in ``namespace`` (its cluster-wide rules included), by the API server."""
    request = urllib.request.Request(
        f"{cluster.api_url}/apis/authorization.k8s.io/v1/selfsubjectrulesreviews",
        data=json.dumps(
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SelfSubjectRulesReview",
                "spec": {"namespace": namespace},
            }
        ).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10, context=cluster.ssl_context()) as response:
        status = json.load(response)["status"]
    assert not status.get("incomplete"), status
    return atoms(status["resourceRules"])


def can_i(cluster: ControlPlane, kubeconfig: Path, access: Access, namespace: str) -> bool:
    resource = f"{access.resource}.{access.group}" if access.group else access.resource
    args = ["auth", "can-i", access.verb, resource]
    if access.subresource:
        args.append(f"--subresource={access.subresource}")
    args += ["--all-namespaces"] if access.verb in {"list", "watch"} else ["-n", namespace]
    return cluster.kubectl(*args, kubeconfig=kubeconfig, check=False).stdout.strip() == "yes"


@pytest.fixture
def cluster_role_binding_cleanup(cluster: ControlPlane, namespace: str) -> Iterator[None]:
    yield
    # Cluster-scoped: the namespace's deletion does not take it.
    cluster.kubectl("delete", "clusterrolebinding", f"kubemeter-agent-{namespace}-{COLLECTOR}", check=False)


@pytest.mark.integration
@pytest.mark.usefixtures("cluster_role_binding_cleanup")
def test_agent_and_gateway_meter_a_pod_on_their_rendered_serviceaccount_tokens(
    cluster: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    node = next(n for n in cluster.nodes if "nvidia.com/gpu" not in n.capacity)
    other_node = next(n for n in cluster.nodes if n.name != node.name)
    processes: list[Process] = []
    sink_port = free_port()
    sink_url = f"http://127.0.0.1:{sink_port}"
    children = render(namespace, sink_url)
    agent_sa, gateway_sa = f"{COLLECTOR}-agent", f"{COLLECTOR}-gateway"
    apply_as_the_operator(
        cluster, [get_agent_cluster_role(), *[c for c in children if c["kind"] in RBAC_KINDS]]
    )
    agent_token, agent_kubeconfig = mint_token(cluster, namespace, agent_sa, tmp_path / "agent.kubeconfig")
    gateway_token, _ = mint_token(cluster, namespace, gateway_sa, tmp_path / "unused.kubeconfig")

    # What each token may do, as the API server sees it. The gateway's ServiceAccount is bound to
    # nothing, so its rules are what every authenticated identity has (the baseline).
    baseline = rules_review(cluster, gateway_token, namespace)
    assert all(group in {"authorization.k8s.io", "authentication.k8s.io"} for group, *_ in baseline), baseline
    assert rules_review(cluster, agent_token, namespace) - baseline == uses_as_atoms(AGENT_USES)
    refused = [
        a
        for a in AGENT_USES
        if a.subresource != "stats" and not can_i(cluster, agent_kubeconfig, a, namespace)
    ]
    assert refused == [], f"the agent's token may not {refused}"
    allowed = [a for a in AGENT_MUST_NOT if can_i(cluster, agent_kubeconfig, a, namespace)]
    assert allowed == [], f"the agent's token may {allowed}, which the agent never needs"

    pods = {}
    for name, on in (("metered", node), ("elsewhere", other_node)):
        manifest = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name},
            "spec": {
                "nodeName": on.name,
                "containers": [{"name": "main", "image": "fake", "resources": {"requests": {"cpu": "500m"}}}],
            },
        }
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
        pods[name] = cluster.get_json("pod", name, "-n", namespace)
    kubelet = AuthorizingKubelet(cluster, node, pods["metered"], tmp_path / "pki")
    no_api = NoApiListener()
    config_map = child(children, "ConfigMap", f"{COLLECTOR}-config")["data"]
    try:
        processes.append(
            Process(
                "sink",
                [
                    "sink",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(sink_port),
                    "--data-dir",
                    str(tmp_path / "sink"),
                ],
                tmp_path,
            )
        )
        wait_for(lambda: http_get(f"{sink_url}/healthz") is not None, timeout_s=30, what="kubemeter sink")

        gateway_port = free_port()
        rendered_gateway = GatewayConfig.from_yaml(config_map["gateway.yaml"])
        # Authenticated ingest by default: the operator's generated token Secret, created in the API
        # server as the operator creates it, and mounted (the kubelet's part) where both configs say.
        assert rendered_gateway.ingest_token_file == f"{SECRETS_DIR}/{COLLECTOR}-ingest-token/token"
        token_file = mount_generated_token(cluster, namespace, tmp_path / "secrets")
        gateway_config = rendered_gateway.model_copy(
            update={
                "data_dir": str(tmp_path / "gateway"),
                "listen_address": f"127.0.0.1:{gateway_port}",
                "ingest_token_file": str(token_file),
            }
        )
        assert gateway_config.output.url == sink_url
        (tmp_path / "gateway.yaml").write_text(gateway_config.to_yaml())
        gateway_kubeconfig = tmp_path / "gateway.kubeconfig"
        config = yaml.safe_load(
            cluster.kubeconfig_text(
                token=gateway_token, user=f"system:serviceaccount:{namespace}:{gateway_sa}"
            )
        )
        config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{no_api.port}"
        gateway_kubeconfig.write_text(json.dumps(config))
        gateway_env = {
            "KUBECONFIG": str(gateway_kubeconfig),
            "KUBERNETES_SERVICE_HOST": "127.0.0.1",
            "KUBERNETES_SERVICE_PORT": str(no_api.port),
        }
        processes.append(
            Process("gateway", ["gateway", "--config", str(tmp_path / "gateway.yaml")], tmp_path, gateway_env)
        )
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        wait_for(lambda: http_get(f"{gateway_url}/readyz") is not None, timeout_s=30, what="the gateway")
        assert ingest_status(gateway_url, None) == 401, "ingest must refuse a request without the token"
        assert ingest_status(gateway_url, "not-the-token") == 401

        rendered_agent = AgentConfig.from_yaml(config_map["agent.yaml"])
        assert rendered_agent.kubelet_url is None, "the agent must find its kubelet from its Node"
        assert rendered_agent.ingest_token_file == rendered_gateway.ingest_token_file
        agent_config = rendered_agent.model_copy(
            update={
                "ingest_token_file": str(token_file),
                "gateway_url": gateway_url,
                "spool_dir": str(tmp_path / "agent" / "spool"),
                "checkpoint_dir": str(tmp_path / "agent" / "checkpoints"),
                "metrics_port": free_port(),
            }
        )
        (tmp_path / "agent.yaml").write_text(agent_config.to_yaml())
        processes.append(
            Process(
                "agent",
                [
                    "agent",
                    "--config",
                    str(tmp_path / "agent.yaml"),
                    "--node-name",
                    node.name,
                    "--kubeconfig",
                    str(agent_kubeconfig),
                ],
                tmp_path,
                {"KUBEMETER_KUBELET_CA_FILE": str(kubelet.cert)},
            )
        )

        def delivered() -> dict[str, list[dict[str, Any]]] | None:
            for process in processes:
                process.check()
            events = (http_json(f"{sink_url}/api/v1/usage/events") or {}).get("events") or []
            by_type: dict[str, list[dict[str, Any]]] = {}
            for event in events:
                by_type.setdefault(event["type"], []).append(event)
            used = [e for e in by_type.get("cpu-used", []) if float(e["value"]) > 0]
            allocated = [e for e in by_type.get("cpu-allocated", []) if float(e["value"]) > 0]
            return by_type if used and allocated else None

        try:
            by_type = wait_for(delivered, timeout_s=120, what="allocation and kubelet usage at the sink")
        except TimeoutError as error:
            logs = "\n".join(f"--- {p.name}\n{p.log()[-3000:]}" for p in processes)
            raise AssertionError(f"{error}\nkubelet decisions: {kubelet.decisions}\n{logs}") from None
    finally:
        for process in reversed(processes):
            process.stop()
        no_api.stop()

    try:
        metered_pods = {e["dimensions"].get("pod") for events in by_type.values() for e in events}
        assert metered_pods == {"metered"}, "the agent metered a pod of another node"
        agent_user = f"system:serviceaccount:{namespace}:{agent_sa}"
        stats = [d for d in kubelet.decisions if d.subresource == "stats"]
        assert stats and all(d.allowed and d.user == agent_user for d in stats), kubelet.decisions
        agent_log = processes[-1].log()
        assert " 403" not in agent_log and "Forbidden" not in agent_log, agent_log[-3000:]
        assert no_api.connections == 0, "the gateway called the Kubernetes API; give it RBAC and test it here"

        # The kubelet's own refusals: the agent reads stats and nothing else of its kubelet, and the
        # gateway's token reads nothing.
        assert kubelet.get("/stats/summary", agent_token) == 200
        assert kubelet.get("/logs/", agent_token) == 403
        assert kubelet.get("/pods", agent_token) == 403
        assert kubelet.get("/run/default/p/c", agent_token) == 403
        assert kubelet.get("/stats/summary", gateway_token) == 403
        assert kubelet.get("/stats/summary", "not-a-token") == 401
    finally:
        kubelet.stop()
