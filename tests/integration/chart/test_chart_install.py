"""`helm install` on the real control plane: the chart installs under Pod Security "restricted", the
operator does its whole job with nothing but the chart's ServiceAccount token (peering included),
that token can do nothing more, and `helm uninstall` keeps the CRDs, the default Collector and the
gateways' PersistentVolumeClaims."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from testbed.controlplane import REPO_ROOT, ControlPlane, free_port, wait_for
from tests.unit.chart.chart_tools import CHART_DIR, helm

pytestmark = pytest.mark.integration

RELEASE = "km"
OPERATOR_SA = "km-kubemeter-operator"
COLLECTOR = "default"
CRD_NAMES = (
    "collectors.kubemeter.io",
    "meters.kubemeter.io",
    "pipelines.kubemeter.io",
    "clusterkopfpeerings.kopf.dev",
)


class Access(NamedTuple):
    verb: str
    resource: str  # plural.group, as kubectl auth can-i takes it
    subresource: str = ""
    name: str = ""


def each(verbs: str, *resources: str, subresource: str = "") -> list[Access]:
    return [Access(verb, resource, subresource) for resource in resources for verb in verbs.split()]


CRS = ("meters.kubemeter.io", "collectors.kubemeter.io", "pipelines.kubemeter.io")

# Every request the operator makes (kopf included), and what it must hold to grant agents theirs.
OPERATOR_USES: list[Access] = [
    *each("get list watch patch", *CRS),
    *each("get patch", *CRS, subresource="status"),
    Access("update", "collectors.kubemeter.io", "finalizers"),
    *each("get list watch patch", "clusterkopfpeerings.kopf.dev"),
    *each("get list watch", "customresourcedefinitions.apiextensions.k8s.io"),
    *each("create patch", "events", "events.events.k8s.io"),
    *each("get create patch delete", "serviceaccounts", "configmaps", "services"),
    *each("get create", "secrets"),
    *each("list watch", "pods", "namespaces"),
    Access("get", "nodes"),
    Access("get", "nodes", "stats"),
    *each("get list", "persistentvolumeclaims"),
    *each("get list watch create patch delete", "daemonsets.apps", "statefulsets.apps"),
    *each("get create patch delete", "poddisruptionbudgets.policy"),
    *each("get create patch delete", "clusterrolebindings.rbac.authorization.k8s.io"),
    *[
        Access(verb, "clusterroles.rbac.authorization.k8s.io", name="kubemeter-agent")
        for verb in ("get", "patch", "bind")
    ],
    Access("create", "clusterroles.rbac.authorization.k8s.io"),
]

# What it must not do, though a careless ClusterRole would allow it.
OPERATOR_MUST_NOT: list[Access] = [
    *each("list watch update patch delete", "secrets"),
    *each("delete patch", "nodes"),
    *each("get create delete", "pods"),
    Access("create", "pods", "exec"),
    Access("get", "nodes", "proxy"),
    *each("create", "roles.rbac.authorization.k8s.io", "rolebindings.rbac.authorization.k8s.io"),
    Access("delete", "namespaces"),
    Access("delete", "persistentvolumeclaims"),
    *each("create delete", "customresourcedefinitions.apiextensions.k8s.io"),
    *each("create delete", *CRS),
    *each("delete escalate", "clusterroles.rbac.authorization.k8s.io"),
    *[Access(verb, "clusterroles.rbac.authorization.k8s.io", name="admin") for verb in ("get", "patch")],
    Access("bind", "clusterroles.rbac.authorization.k8s.io", name="cluster-admin"),
    Access("impersonate", "users"),
    Access("create", "deployments.apps"),
    Access("create", "serviceaccounts", "token"),
]


class TokenOperator:
    """``kubemeter operator`` (peering on) authenticated only by the chart ServiceAccount's token."""

    def __init__(self, kubeconfig: Path, log_path: Path, namespaces: list[str]) -> None:
        self.kubeconfig = kubeconfig
        self.namespaces = namespaces  # as the chart's operator.watchNamespaces passes them
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "KUBEMETER_RESYNC_SECONDS": "5",
            "KUBEMETER_CLUSTER_NAME": "chart-it",
            "KUBEMETER_GATEWAY_STATUS_TIMEOUT_SECONDS": "0.5",
        }
        argv = [sys.executable, "-m", "kubemeter_cli", "operator", "--metrics-port", "0"]
        argv += ["--liveness-port", str(free_port()), "--priority", "100"]
        argv += [f"--namespace={namespace}" for namespace in self.namespaces]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                argv, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT
            )

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def get(cluster: ControlPlane, *args: str) -> Any:
    result = cluster.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


# Held cluster-wide in every mode; everything else only in the watched namespaces.
CLUSTER_WIDE = {
    "pods",
    "namespaces",
    "clusterkopfpeerings.kopf.dev",
    "customresourcedefinitions.apiextensions.k8s.io",
}
# What it must not do in a namespace it does not watch (operator.watchNamespaces).
OUTSIDE_MUST_NOT: list[Access] = [
    Access("get", "secrets"),
    Access("create", "secrets"),
    *each("create patch", "daemonsets.apps", "statefulsets.apps", "configmaps", "serviceaccounts"),
    *each("list watch patch", *CRS),
    Access("create", "events"),
]


def can_i(cluster: ControlPlane, kubeconfig: Path, access: Access, namespace: str) -> bool:
    resource = f"{access.resource}/{access.name}" if access.name else access.resource
    args = ["auth", "can-i", access.verb, resource]
    if access.subresource:
        args.append(f"--subresource={access.subresource}")
    wide = access.verb in {"list", "watch"} and access.resource in CLUSTER_WIDE
    args += ["--all-namespaces"] if wide else ["-n", namespace]
    result = cluster.kubectl(*args, kubeconfig=kubeconfig, check=False)
    return result.stdout.strip() == "yes"


def assert_the_operator_scope_policy_holds(cluster: ControlPlane, kubeconfig: Path, namespace: str) -> None:
    """What RBAC cannot name, the chart's ValidatingAdmissionPolicy kubemeter-operator-scope refuses
    to the operator's token: another binding (created or deleted), another ClusterRole, a Secret
    that is not a generated ingest token. The operator's own writes pass (the rest of the test)."""
    policy = "ValidatingAdmissionPolicy 'kubemeter-operator-scope'"
    unrelated = f"unrelated-{namespace}"
    cluster.kubectl(
        "create",
        "clusterrolebinding",
        unrelated,
        "--clusterrole=view",
        f"--serviceaccount={namespace}:nobody",
    )
    attempts = {
        "a binding of another name": (
            ["create", "clusterrolebinding", f"other-{namespace}", "--clusterrole=kubemeter-agent"],
            f'to the ClusterRole kubemeter-agent, not "other-{namespace}"',
        ),
        "deleting another binding": (
            ["delete", "clusterrolebinding", unrelated],
            f'not "{unrelated}"',
        ),
        "another ClusterRole": (
            ["create", "clusterrole", f"other-{namespace}", "--verb=list", "--resource=pods"],
            f'writes only the ClusterRole kubemeter-agent, not "other-{namespace}"',
        ),
        "a Secret of its choosing": (
            ["create", "secret", "generic", "stolen", "-n", namespace, "--from-literal=k=v"],
            'creates only the generated <collector>-ingest-token Secrets, not "stolen"',
        ),
    }
    try:

        def refused(args: list[str]) -> str | None:
            result = cluster.kubectl(*args, kubeconfig=kubeconfig, check=False)
            return result.stderr if result.returncode != 0 and policy in result.stderr else None

        # The policy enforces once the API server has compiled it.
        first_args, _ = attempts["a binding of another name"]
        wait_for(lambda: refused(first_args), timeout_s=60, what="the operator-scope policy to enforce")
        for what, (args, message) in attempts.items():
            stderr = refused(args)
            assert stderr is not None and message in stderr, f"{what}: {stderr}"
        assert get(cluster, "clusterrolebinding", unrelated) is not None
    finally:
        cluster.kubectl("delete", "clusterrolebinding", unrelated, f"other-{namespace}", check=False)
        cluster.kubectl("delete", "clusterrole", f"other-{namespace}", check=False)
        cluster.kubectl("delete", "secret", "stolen", "-n", namespace, check=False)


@pytest.fixture
def release_namespace(cluster: ControlPlane, namespace: str) -> Iterator[str]:
    # Every pod the chart creates must pass the "restricted" Pod Security level, or it is refused.
    cluster.kubectl(
        "label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted", "--overwrite"
    )
    yield namespace
    # The kept Collector carries the operator's finalizer; without an operator, release it by hand.
    cluster.kubectl(
        "patch",
        "collector",
        COLLECTOR,
        "-n",
        namespace,
        "--type=merge",
        "-p",
        '{"metadata":{"finalizers":null}}',
        check=False,
    )
    cluster.kubectl("delete", "collector", COLLECTOR, "-n", namespace, "--wait=false", check=False)
    cluster.kubectl("delete", "clusterrolebinding", f"kubemeter-agent-{namespace}-{COLLECTOR}", check=False)


def test_install_run_the_operator_on_its_own_token_and_uninstall(
    cluster: ControlPlane, release_namespace: str, tmp_path: Path
) -> None:
    namespace = release_namespace
    home = tmp_path / "helm"
    kube = ["--kubeconfig", str(cluster.kubeconfig), "--namespace", namespace]
    values = [
        *("--set", "operator.replicas=2", "--set", "collector.enabled=true"),
        *("--set", "collector.spec.buffer.size=1Gi", "--set", "collector.spec.gateway.replicas=1"),
        *("--set", "networkPolicy.enabled=true"),
        # the narrowed mode: namespaced rights by a RoleBinding in the release namespace only
        *("--set", f"operator.watchNamespaces={{{namespace}}}"),
    ]
    installed = helm(
        "install",
        RELEASE,
        str(CHART_DIR),
        *kube,
        *values,
        "--wait",
        "--timeout",
        "120s",
        home=home,
        check=False,
        timeout_s=180,
    )
    assert installed.returncode == 0, installed.stderr
    # The API server validated every object on create; an upgrade dry run validates them again with
    # the CRDs now served (a first-install dry run cannot: its CRDs do not exist yet).
    dry = helm("upgrade", RELEASE, str(CHART_DIR), *kube, *values, "--dry-run=server", home=home, check=False)
    assert dry.returncode == 0, dry.stderr
    deployment = get(cluster, "-n", namespace, "deployment", f"{RELEASE}-kubemeter-operator")
    assert deployment["status"].get("readyReplicas") == 2, deployment["status"]
    for crd in CRD_NAMES:
        assert get(cluster, "crd", crd) is not None

    token = cluster.kubectl("create", "token", OPERATOR_SA, "-n", namespace, "--duration=1h").stdout.strip()
    kubeconfig = tmp_path / "operator.kubeconfig"
    kubeconfig.write_text(cluster.kubeconfig_text(token=token, user=OPERATOR_SA))

    refused = [a for a in OPERATOR_USES if not can_i(cluster, kubeconfig, a, namespace)]
    assert refused == [], f"the chart's ServiceAccount may not {refused}"
    allowed = [a for a in OPERATOR_MUST_NOT if can_i(cluster, kubeconfig, a, namespace)]
    assert allowed == [], f"the chart's ServiceAccount may {allowed}, which the operator never needs"
    elsewhere = [a for a in OUTSIDE_MUST_NOT if can_i(cluster, kubeconfig, a, "default")]
    assert elsewhere == [], f"outside its watched namespace the chart's ServiceAccount may {elsewhere}"
    assert allowed == [], f"the chart's ServiceAccount may {allowed}, which the operator never needs"
    # RBAC's escalation check: it may bind kubemeter-agent, not hand out cluster-admin.
    escalation = cluster.kubectl(
        "create",
        "clusterrolebinding",
        f"escalate-{namespace}",
        "--clusterrole=cluster-admin",
        f"--serviceaccount={namespace}:{OPERATOR_SA}",
        kubeconfig=kubeconfig,
        check=False,
    )
    assert escalation.returncode != 0 and "forbidden" in escalation.stderr
    assert_the_operator_scope_policy_holds(cluster, kubeconfig, namespace)

    operator = TokenOperator(kubeconfig, tmp_path / "operator.log", [namespace])
    operator.start()
    try:

        def collector_reconciled() -> Any:
            collector = get(cluster, "-n", namespace, "collector", COLLECTOR)
            status = (collector or {}).get("status") or {}
            generation = collector["metadata"]["generation"] if collector else None
            return collector if status.get("observedGeneration") == generation else None

        def children_exist() -> bool:
            return (
                all(
                    get(cluster, "-n", namespace, kind, name) is not None
                    for kind, name in (
                        ("daemonset", f"{COLLECTOR}-agent"),
                        ("statefulset", f"{COLLECTOR}-gateway"),
                        ("configmap", f"{COLLECTOR}-config"),
                        ("poddisruptionbudget", f"{COLLECTOR}-gateway"),
                        ("serviceaccount", f"{COLLECTOR}-agent"),
                        # authenticated ingest by default: the token Secret, created with the chart token
                        ("secret", f"{COLLECTOR}-ingest-token"),
                    )
                )
                and get(cluster, "clusterrolebinding", f"kubemeter-agent-{namespace}-{COLLECTOR}") is not None
            )

        try:
            wait_for(
                children_exist, timeout_s=90, what="the Collector's children, applied with the chart token"
            )
            wait_for(
                collector_reconciled, timeout_s=60, what="the Collector status, patched with the chart token"
            )
            wait_for(
                lambda: get(cluster, "-n", namespace, "pvc")["items"],
                timeout_s=60,
                what="the gateway's PersistentVolumeClaim",
            )
        except TimeoutError as error:
            raise AssertionError(f"{error}\noperator log:\n{operator.log_tail()}") from None
        # kopf writes its peering status on its own schedule, after the first reconciles.
        wait_for(
            lambda: (get(cluster, "clusterkopfpeering", "kubemeter") or {}).get("status"),
            timeout_s=60,
            what="the operator to join the peering (ClusterKopfPeering status)",
        )
        log = operator.log_tail()
        assert "403" not in log and "Forbidden" not in log, log
    finally:
        operator.stop()

    pvcs_before = {p["metadata"]["name"] for p in get(cluster, "-n", namespace, "pvc")["items"]}
    uninstalled = helm("uninstall", RELEASE, *kube, "--wait", "--timeout", "60s", home=home, check=False)
    assert uninstalled.returncode == 0, uninstalled.stderr
    assert get(cluster, "-n", namespace, "deployment", f"{RELEASE}-kubemeter-operator") is None
    assert get(cluster, "clusterrole", f"{RELEASE}-kubemeter-operator") is None
    for crd in CRD_NAMES:
        assert get(cluster, "crd", crd) is not None, f"helm uninstall deleted CRD {crd}"
    assert get(cluster, "-n", namespace, "collector", COLLECTOR) is not None, "the default Collector is kept"
    pvcs_after = {p["metadata"]["name"] for p in get(cluster, "-n", namespace, "pvc")["items"]}
    assert pvcs_before and pvcs_after == pvcs_before
