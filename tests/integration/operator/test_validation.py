"""Bad input is refused by the API server at apply, with a message that names the field and the fix."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from testbed.controlplane import REPO_ROOT, ControlPlane

pytestmark = pytest.mark.integration

METER: dict[str, Any] = {
    "eventType": "gpu-seconds",
    "unit": "gpu-seconds",
    "source": {"allocation": {"resource": "nvidia.com/gpu"}},
}
OUTPUT: dict[str, Any] = {"type": "openmeter", "url": "http://openmeter:8888"}
PROMETHEUS: dict[str, Any] = {"url": "https://prometheus:9090", "query": "DCGM_FI_DEV_FB_USED"}
TEN = "[0,1,2,3,4,5,6,7,8,9]"
# Issue #14's CEL attack (190 characters, minutes in celpy): refused before any agent sees it.
CEL_ATTACK = (
    f"{TEN}.map(a,{TEN}.map(b,{TEN}.map(c,{TEN}.map(d,{TEN}.all(e,"
    "a+b+c+d+e>=0 && pod.metadata.name != 'attack')))))"
)
EVENT_ATTACK = CEL_ATTACK.replace("pod", "event")
CEL_COST = "more than 2 comprehensions (all, exists, exists_one, map, filter)"


def resource(kind: str, spec: dict[str, Any], name: str = "x") -> dict[str, Any]:
    return {"apiVersion": "kubemeter.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**base, **changes}


INVALID: list[tuple[str, dict[str, Any], str]] = [
    (
        "meter-no-source",
        resource("Meter", with_(METER, source={})),
        "set exactly one of allocation, dra, idle, kubeletUsage",
    ),
    (
        "meter-two-sources",
        resource(
            "Meter", with_(METER, source={"allocation": {"resource": "cpu"}, "nvml": {"metric": "energy"}})
        ),
        "set exactly one of allocation, dra, idle, kubeletUsage, nvml, prometheus or runai",
    ),
    (
        "meter-bad-basis",
        resource("Meter", with_(METER, source={"allocation": {"resource": "cpu", "basis": "usage"}})),
        'spec.source.allocation.basis: Unsupported value: "usage": supported values: "requests", "limits", '
        '"maxRequestUsage"',
    ),
    (
        "meter-usage-basis-for-a-gpu",
        resource(
            "Meter",
            with_(METER, source={"allocation": {"resource": "nvidia.com/gpu", "basis": "maxRequestUsage"}}),
        ),
        "spec.source.allocation.basis: maxRequestUsage compares with kubelet usage, which exists for cpu and "
        "memory only",
    ),
    (
        "meter-idle-resource-and-devices",
        resource("Meter", with_(METER, source={"idle": {"resource": "cpu", "devices": {}}})),
        "spec.source.idle: set exactly one of resource (cpu, memory, nvidia.com/gpu, ...) or devices",
    ),
    (
        "meter-dra-selector-too-long",
        resource("Meter", with_(METER, source={"dra": {"selector": "true || " * 200 + "true"}})),
        "spec.source.dra.selector: Too long: may not be more than 1024",
    ),
    (
        "meter-bad-nvml-metric",
        resource("Meter", with_(METER, source={"nvml": {"metric": "temperature"}})),
        'Unsupported value: "temperature"',
    ),
    (
        "meter-window-not-dividing-a-day",
        resource("Meter", with_(METER, windowSeconds=7001)),
        "spec.windowSeconds must divide a day (86400) evenly",
    ),
    (
        "meter-window-too-short",
        resource("Meter", with_(METER, windowSeconds=5)),
        "spec.windowSeconds: Invalid value: 5: spec.windowSeconds in body should be greater than or "
        "equal to 10",
    ),
    (
        "meter-missing-event-type",
        resource("Meter", {"unit": "u", "source": METER["source"]}),
        "spec.eventType: Required",
    ),
    (
        "meter-prometheus-without-url",
        resource("Meter", with_(METER, source={"prometheus": {"query": "up"}})),
        "spec.source.prometheus.url: Required value",
    ),
    (
        "meter-prometheus-bad-url",
        resource("Meter", with_(METER, source={"prometheus": {"url": "prometheus:9090", "query": "up"}})),
        "spec.source.prometheus.url: Invalid value",
    ),
    (
        "meter-dimension-key-not-an-identifier",
        resource("Meter", with_(METER, dimensions={"gpu-model": "node.metadata.name"})),
        "spec.dimensions: every key must match",
    ),
    (
        "meter-selector-in-without-values",
        resource(
            "Meter", with_(METER, pods={"selector": {"matchExpressions": [{"key": "a", "operator": "In"}]}})
        ),
        "operator In and NotIn need at least one entry in values",
    ),
    (
        "meter-unknown-field",
        resource("Meter", with_(METER, windowSecs=60)),
        'unknown field "spec.windowSecs"',
    ),
    ("collector-without-output", resource("Collector", {}), "spec.output: Required value"),
    (
        "collector-bad-output-type",
        resource("Collector", {"output": with_(OUTPUT, type="stripe")}),
        'spec.output.type: Unsupported value: "stripe"',
    ),
    (
        "collector-lago-without-credentials",
        resource("Collector", {"output": with_(OUTPUT, type="lago")}),
        "output.credentialsSecretRef is required for type lago and flexprice",
    ),
    (
        "collector-credentials-in-headers",
        resource("Collector", {"output": with_(OUTPUT, headers={"Authorization": "Bearer abc"})}),
        "output.headers must not carry credentials",
    ),
    (
        "collector-backoff-inverted",
        resource(
            "Collector",
            {"output": with_(OUTPUT, retry={"initialBackoffSeconds": 600, "maxBackoffSeconds": 60})},
        ),
        "initialBackoffSeconds must not exceed maxBackoffSeconds",
    ),
    (
        "collector-buffer-too-small",
        resource("Collector", {"output": OUTPUT, "buffer": {"size": "1Mi"}}),
        "buffer.size must be at least 4Mi",
    ),
    (
        "collector-bad-buffer-size",
        resource("Collector", {"output": OUTPUT, "buffer": {"size": "10GB"}}),
        "spec.buffer.size: Invalid value",
    ),
    (
        "collector-bad-when-full",
        resource("Collector", {"output": OUTPUT, "buffer": {"whenFull": "Drop"}}),
        'spec.buffer.whenFull: Unsupported value: "Drop"',
    ),
    (
        "collector-zero-replicas",
        resource("Collector", {"output": OUTPUT, "gateway": {"replicas": 0}}),
        "spec.gateway.replicas: Invalid value: 0",
    ),
    (
        "collector-name-too-long",
        resource("Collector", {"output": OUTPUT}, name="c" * 41),
        "metadata.name of a Collector must be at most 40 characters",
    ),
    (
        "collector-toleration-exists-with-value",
        resource(
            "Collector", {"output": OUTPUT, "tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}
        ),
        "operator Exists takes no value",
    ),
    (
        "pipeline-meters-and-selector",
        resource("Pipeline", {"collectorRef": "c", "meters": ["a"], "meterSelector": {}}),
        "set exactly one of meters (a list of Meter names) or meterSelector",
    ),
    (
        "meter-prometheus-two-auths",
        resource(
            "Meter",
            with_(
                METER,
                source={
                    "prometheus": {
                        **PROMETHEUS,
                        "bearerTokenSecretRef": {"name": "t", "key": "token"},
                        "basicAuthSecretRef": {"name": "b"},
                    }
                },
            ),
        ),
        "set bearerTokenSecretRef or basicAuthSecretRef, not both",
    ),
    (
        "meter-prometheus-credentials-in-headers",
        resource(
            "Meter",
            with_(METER, source={"prometheus": {**PROMETHEUS, "headers": {"Authorization": "Bearer x"}}}),
        ),
        "headers must not carry credentials (Authorization)",
    ),
    (
        "meter-prometheus-ca-and-insecure",
        resource(
            "Meter",
            with_(
                METER,
                source={"prometheus": {**PROMETHEUS, "tls": {"caFile": "/ca", "insecureSkipVerify": True}}},
            ),
        ),
        "set caFile or insecureSkipVerify, not both",
    ),
    (
        "meter-runai-more-than-1000-samples",
        resource(
            "Meter",
            with_(
                METER,
                windowSeconds=3600,
                source={
                    "runai": {
                        "url": "https://org.run.ai",
                        "metric": "GPU_ALLOCATION",
                        "credentialsSecretRef": {"name": "r"},
                        "sampleStepSeconds": 1,
                    }
                },
            ),
        ),
        "Run:ai returns at most 1000 samples per request",
    ),
    (
        "collector-ingest-token-in-the-billing-secret",
        resource(
            "Collector",
            {
                "output": with_(OUTPUT, credentialsSecretRef={"name": "om", "key": "token"}),
                "gateway": {"ingestTokenSecretRef": {"name": "om", "key": "ingest"}},
            },
        ),
        "gateway.ingestTokenSecretRef must name a Secret of its own",
    ),
    (
        "collector-lago-options-on-openmeter",
        resource("Collector", {"output": with_(OUTPUT, lago={"subscriptionIdDimension": "sub"})}),
        "output.lago applies to type lago only",
    ),
    (
        "collector-lago-dimension-and-expression",
        resource(
            "Collector",
            {
                "output": {
                    "type": "lago",
                    "url": "https://lago/api/v1",
                    "credentialsSecretRef": {"name": "lago", "key": "key"},
                    "lago": {"subscriptionIdDimension": "sub", "subscriptionIdExpression": "event.subject"},
                }
            },
        ),
        "set subscriptionIdDimension or subscriptionIdExpression, not both",
    ),
    (
        "collector-cloudevents-bad-mode",
        resource(
            "Collector",
            {"output": {"type": "cloudevents", "url": "https://ce/in", "cloudevents": {"mode": "binary"}}},
        ),
        'Unsupported value: "binary": supported values: "batch", "structured"',
    ),
    (
        "pipeline-neither-meters-nor-selector",
        resource("Pipeline", {"collectorRef": "c"}),
        "set exactly one of meters (a list of Meter names) or meterSelector",
    ),
    (
        "pipeline-processor-two-actions",
        resource(
            "Pipeline",
            {"collectorRef": "c", "meters": ["a"], "processors": [{"filter": "true", "drop": ["x"]}]},
        ),
        "set exactly one of filter, set, drop or rename in each processor",
    ),
    (
        "pipeline-drops-a-required-key",
        resource("Pipeline", {"collectorRef": "c", "meters": ["a"], "processors": [{"drop": ["value"]}]}),
        "are required in every event and cannot be dropped",
    ),
    (
        "pipeline-renames-onto-a-required-key",
        resource(
            "Pipeline", {"collectorRef": "c", "meters": ["a"], "processors": [{"rename": {"team": "unit"}}]}
        ),
        "cannot be renamed or overwritten",
    ),
    (
        "collector-kafka-without-options",
        resource("Collector", {"output": {"type": "kafka"}}),
        "output.kafka is required for type kafka and applies to it only",
    ),
    (
        "collector-kafka-two-topics",
        resource(
            "Collector",
            {
                "output": {
                    "type": "kafka",
                    "kafka": {"bootstrapServers": ["k:9092"], "topic": "a", "topicExpression": "'b'"},
                }
            },
        ),
        "output.kafka: set exactly one of topic (a fixed topic) and topicExpression",
    ),
    (
        "collector-kafka-with-url",
        resource(
            "Collector",
            {
                "output": {
                    "type": "kafka",
                    "url": "http://x:1",
                    "kafka": {"bootstrapServers": ["k:9092"], "topic": "a"},
                }
            },
        ),
        "output.url is required for the HTTP outputs and does not apply to type kafka",
    ),
    (
        "meter-subject-cel-over-the-cost-limit",
        resource("Meter", with_(METER, subject={"expression": CEL_ATTACK})),
        f'spec.subject.expression: Invalid value: "{CEL_ATTACK}": {CEL_COST}',
    ),
    (
        "meter-dimension-cel-over-the-cost-limit",
        resource("Meter", with_(METER, dimensions={"team": CEL_ATTACK})),
        f'spec.dimensions[team]: Invalid value: "{CEL_ATTACK}": {CEL_COST}',
    ),
    (
        "pipeline-filter-cel-over-the-cost-limit",
        resource(
            "Pipeline",
            {
                "collectorRef": "c",
                "meters": ["a"],
                "processors": [{"filter": EVENT_ATTACK}],
            },
        ),
        f'spec.processors[0].filter: Invalid value: "{EVENT_ATTACK}": {CEL_COST}',
    ),
    (
        "collector-lago-cel-over-the-cost-limit",
        resource(
            "Collector",
            {
                "output": {
                    "type": "lago",
                    "url": "https://lago/api/v1",
                    "credentialsSecretRef": {"name": "lago", "key": "key"},
                    "lago": {"subscriptionIdExpression": EVENT_ATTACK},
                }
            },
        ),
        f'spec.output.lago.subscriptionIdExpression: Invalid value: "{EVENT_ATTACK}": {CEL_COST}',
    ),
    (
        "collector-kafka-topic-cel-over-the-cost-limit",
        resource(
            "Collector",
            {
                "output": {
                    "type": "kafka",
                    "kafka": {"bootstrapServers": ["k:9092"], "topicExpression": EVENT_ATTACK},
                }
            },
        ),
        f'spec.output.kafka.topicExpression: Invalid value: "{EVENT_ATTACK}": {CEL_COST}',
    ),
    (
        "pipeline-bad-collector-name",
        resource("Pipeline", {"collectorRef": "Not_A_Name", "meters": ["a"]}),
        "spec.collectorRef: Invalid value",
    ),
]


def test_the_table_is_large_enough() -> None:
    assert len(INVALID) >= 20


@pytest.mark.parametrize(("case", "manifest", "message"), INVALID, ids=[case for case, _, _ in INVALID])
def test_invalid_resource_is_refused_at_apply(
    cluster: ControlPlane, crds: None, namespace: str, case: str, manifest: dict[str, Any], message: str
) -> None:
    result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(manifest), check=False)
    assert result.returncode != 0, f"{case} was accepted: {result.stdout}"
    assert message in result.stderr, result.stderr


def test_every_example_is_accepted_by_the_api_server(
    cluster: ControlPlane, crds: None, namespace: str
) -> None:
    for path in sorted((REPO_ROOT / "examples").glob("*.yaml")):
        cluster.kubectl("apply", "-n", namespace, "--dry-run=server", "-f", str(path))


def test_buffer_shape_cannot_change_once_the_volumes_exist(
    cluster: ControlPlane, crds: None, namespace: str
) -> None:
    collector = resource("Collector", {"output": OUTPUT, "buffer": {"size": "1Gi"}}, name="fixed")
    cluster.kubectl("apply", "-n", namespace, "-f", "-", "--dry-run=server", input=yaml.safe_dump(collector))
    cluster.kubectl("create", "-n", namespace, "-f", "-", input=yaml.safe_dump(collector))
    grown = resource("Collector", {"output": OUTPUT, "buffer": {"size": "2Gi"}}, name="fixed")
    result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(grown), check=False)
    assert result.returncode != 0
    assert "buffer.size and buffer.storageClassName cannot change once the volumes exist" in result.stderr
    cluster.kubectl("delete", "-n", namespace, "collector", "fixed", "--wait=false")


def test_explain_shows_the_descriptions(cluster: ControlPlane, crds: None) -> None:
    explained = cluster.kubectl("explain", "meter.spec.source").stdout
    assert "Where the numbers come from; set exactly one source." in explained
    assert "Allocation of a resource by requests or limits" in explained
    deep = cluster.kubectl("explain", "collector.spec.buffer.onDelete").stdout
    assert "Drain delivers every buffered event first" in deep


def test_category_lists_every_kind(cluster: ControlPlane, crds: None, namespace: str) -> None:
    listed = cluster.kubectl("get", "kubemeter", "-n", namespace, check=False)
    assert listed.returncode == 0, listed.stderr
    names = cluster.kubectl("api-resources", "--api-group=kubemeter.io", "-o", "wide").stdout
    for short in ("mtr", "kmc", "kmp"):
        assert short in names
