"""Issue #14, item 1, at apply: the chart's ValidatingAdmissionPolicy makes the real API server refuse a
Meter whose source names a Secret holding a Collector's billing API key, ingest token (named or
generated) or Kafka credentials, with a message naming the field and the fix; a Meter with a Secret
of its own is accepted. The operator's own check (status ForbiddenSecret, nothing mounted) is in
test_operator.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.controlplane import ControlPlane, wait_for
from tests.unit.chart.chart_tools import CHART_DIR, KUBE_VERSION, helm

pytestmark = pytest.mark.integration

POLICY = "kubemeter-meter-secrets"


@pytest.fixture
def admission_policy(cluster: ControlPlane, crds: None, tmp_path: Path) -> Iterator[str]:
    rendered = helm(
        "template",
        "km",
        str(CHART_DIR),
        "--kube-version",
        KUBE_VERSION,
        "--show-only",
        "templates/admission-policy.yaml",
        home=tmp_path / "helm",
    ).stdout
    cluster.kubectl("apply", "-f", "-", input=rendered)
    try:
        yield rendered
    finally:
        cluster.kubectl("delete", "-f", "-", "--ignore-not-found", input=rendered, check=False)


def meter(name: str, source: dict[str, Any]) -> str:
    spec = {"eventType": "e", "unit": "u", "source": source}
    return yaml.safe_dump(
        {"apiVersion": "kubemeter.io/v1alpha1", "kind": "Meter", "metadata": {"name": name}, "spec": spec}
    )


def prometheus(**auth: Any) -> dict[str, Any]:
    return {"prometheus": {"url": "https://attacker.example", "query": "up", **auth}}


def test_a_meter_naming_a_collectors_secret_is_refused_at_apply(
    cluster: ControlPlane, namespace: str, admission_policy: str
) -> None:
    collector = {
        "apiVersion": "kubemeter.io/v1alpha1",
        "kind": "Collector",
        "metadata": {"name": "c"},
        "spec": {
            "output": {
                "type": "openmeter",
                "url": "http://om",
                "credentialsSecretRef": {"name": "om", "key": "k"},
            },
            "gateway": {"ingestTokenSecretRef": {"name": "ingest", "key": "token"}},
        },
    }
    other = {"apiVersion": "kubemeter.io/v1alpha1", "kind": "Collector", "metadata": {"name": "d"}}
    other["spec"] = {"output": {"type": "openmeter", "url": "http://om"}}
    kafka = {"apiVersion": "kubemeter.io/v1alpha1", "kind": "Collector", "metadata": {"name": "k"}}
    kafka["spec"] = {
        "output": {
            "type": "kafka",
            "kafka": {
                "bootstrapServers": ["kafka:9093"],
                "topic": "usage",
                "tls": {"clientCertificateSecretRef": {"name": "kafka-client"}},
                "sasl": {"secretRef": {"name": "kafka-sasl"}},
            },
        }
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all([collector, other, kafka]))

    def refused(manifest: str) -> str | None:
        result = cluster.kubectl(
            "apply", "-n", namespace, "--dry-run=server", "-f", "-", input=manifest, check=False
        )
        return result.stderr if result.returncode != 0 else None

    attempts = [
        (meter("billing-key", prometheus(bearerTokenSecretRef={"name": "om", "key": "k"})), "om", "c"),
        (meter("named-token", prometheus(basicAuthSecretRef={"name": "ingest"})), "ingest", "c"),
        (
            meter(
                "generated-token",
                {
                    "runai": {
                        "url": "https://attacker.example",
                        "metric": "GPU_ALLOCATION",
                        "credentialsSecretRef": {"name": "d-ingest-token"},
                    }
                },
            ),
            "d-ingest-token",
            "d",
        ),
        (meter("kafka-password", prometheus(basicAuthSecretRef={"name": "kafka-sasl"})), "kafka-sasl", "k"),
        (
            meter("kafka-key", prometheus(bearerTokenSecretRef={"name": "kafka-client", "key": "tls.key"})),
            "kafka-client",
            "k",
        ),
    ]
    # The policy starts enforcing once the API server has compiled it and listed its parameters.
    first = wait_for(lambda: refused(attempts[0][0]), timeout_s=60, what="the admission policy to enforce")
    for manifest, secret, holder in attempts:
        message = first if secret == "om" else refused(manifest)
        assert message is not None, f"a Meter naming Secret {secret} was accepted"
        assert f"ValidatingAdmissionPolicy '{POLICY}'" in message, message
        assert f'spec.source names Secret "{secret}", which holds Collector "{holder}"' in message, message
        assert "name a Secret of its own" in message
    own = meter("own", prometheus(bearerTokenSecretRef={"name": "prom", "key": "token"}))
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=own)
