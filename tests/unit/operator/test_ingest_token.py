"""The gateway's ingest token: one Secret key, mounted into the gateway and every agent at the same
path, named in both rendered configs; checked like the billing credentials; never the billing Secret."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from kubemeter.api.collector import CollectorSpec
from kubemeter.api.rendered import AgentConfig, GatewayConfig
from kubemeter_operator.builders import build_children
from kubemeter_operator.builders.common import CollectorRef
from kubemeter_operator.builders.configmap import get_generated_token_secret
from kubemeter_operator.resolve import ObjectView, referenced_secrets, resolve_namespace
from kubemeter_operator.settings import OperatorSettings
from pydantic import ValidationError

REF = CollectorRef(namespace="billing", name="chargeback", uid="uid-1")
TOKEN_FILE = "/etc/kubemeter/secrets/ingest/token"


def spec(**gateway: Any) -> CollectorSpec:
    return CollectorSpec.model_validate(
        {
            "output": {
                "type": "lago",
                "url": "https://lago/api/v1",
                "credentialsSecretRef": {"name": "lago", "key": "api-key"},
            },
            "gateway": gateway,
        }
    )


def children(collector_spec: CollectorSpec) -> dict[str, dict[str, Any]]:
    return {child["kind"]: child for child in build_children(REF, collector_spec, [], OperatorSettings())}


def pod_of(workload: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = workload["spec"]["template"]["spec"]
    return pod


def test_the_ingest_token_reaches_the_gateway_and_every_agent_at_one_path() -> None:
    rendered = children(spec(ingestTokenSecretRef={"name": "ingest", "key": "token"}))
    config_map = rendered["ConfigMap"]["data"]
    assert AgentConfig.from_yaml(config_map["agent.yaml"]).ingest_token_file == TOKEN_FILE
    assert GatewayConfig.from_yaml(config_map["gateway.yaml"]).ingest_token_file == TOKEN_FILE

    gateway = pod_of(rendered["StatefulSet"])
    volumes = {volume["name"]: volume for volume in gateway["volumes"]}
    # only the token's key, not the rest of the Secret
    assert volumes["ingest-token"]["secret"] == {
        "secretName": "ingest",
        "items": [{"key": "token", "path": "token"}],
        "defaultMode": 0o440,
    }
    mounts = {mount["name"]: mount for mount in gateway["containers"][0]["volumeMounts"]}
    assert mounts["ingest-token"]["mountPath"] + "/token" == TOKEN_FILE
    assert mounts["ingest-token"]["readOnly"] is True

    agent = pod_of(rendered["DaemonSet"])
    agent_mounts = {mount["mountPath"] for mount in agent["containers"][0]["volumeMounts"]}
    assert TOKEN_FILE.rpartition("/")[0] in agent_mounts
    agent_secrets = [v["secret"]["secretName"] for v in agent["volumes"] if "secret" in v]
    assert agent_secrets == ["ingest"]  # never the billing API key


def test_rotating_the_token_restarts_nothing() -> None:
    # The pod templates hold the Secret's name and key, not its value: a new value changes no manifest.
    first = children(spec(ingestTokenSecretRef={"name": "ingest", "key": "token"}))
    again = children(spec(ingestTokenSecretRef={"name": "ingest", "key": "token"}))
    assert first == again


def test_without_an_ingest_token_the_generated_one_is_mounted_and_required() -> None:
    rendered = children(spec())
    generated = "/etc/kubemeter/secrets/chargeback-ingest-token/token"
    config_map = rendered["ConfigMap"]["data"]
    assert GatewayConfig.from_yaml(config_map["gateway.yaml"]).ingest_token_file == generated
    assert AgentConfig.from_yaml(config_map["agent.yaml"]).ingest_token_file == generated
    for workload in (rendered["StatefulSet"], rendered["DaemonSet"]):
        secrets = [v["secret"]["secretName"] for v in pod_of(workload)["volumes"] if "secret" in v]
        assert "chargeback-ingest-token" in secrets, workload["kind"]
    agent_secrets = [
        v["secret"]["secretName"] for v in pod_of(rendered["DaemonSet"])["volumes"] if "secret" in v
    ]
    assert "lago" not in agent_secrets, "the billing API key is never mounted into agents"


def test_the_generated_token_is_random_owned_by_the_collector_and_checked_once_looked_up() -> None:
    first, second = get_generated_token_secret(REF), get_generated_token_secret(REF)
    assert first["metadata"]["name"] == "chargeback-ingest-token"
    assert first["metadata"]["ownerReferences"][0]["uid"] == REF.uid
    assert len(first["stringData"]["token"]) >= 43  # 32 random bytes
    assert first["stringData"]["token"] != second["stringData"]["token"]
    view = ObjectView(
        "Collector", "ns", "c", "uid-c", 1, {}, {"output": {"type": "openmeter", "url": "http://om"}}, {}
    )
    assert referenced_secrets([view], []) == {"c-ingest-token"}
    (missing,) = resolve_namespace([view], [], [], {"c-ingest-token": None}).collector_problems["c"]
    assert missing.reason == "SecretNotFound" and '"c-ingest-token"' in missing.message
    assert (
        resolve_namespace([view], [], [], {"c-ingest-token": frozenset({"token"})}).collector_problems["c"]
        == []
    )


def test_the_ingest_token_may_not_share_the_billing_secret() -> None:
    with pytest.raises(ValidationError, match="must name a Secret of its own"):
        spec(ingestTokenSecretRef={"name": "lago", "key": "ingest"})
    rule = CollectorSpec.model_json_schema()["x-kubernetes-validations"][0]
    assert "ingestTokenSecretRef.name != self.output.credentialsSecretRef.name" in rule["rule"]


def test_a_missing_ingest_token_secret_degrades_the_collector() -> None:
    collector = ObjectView(
        "Collector",
        "ns",
        "c",
        "uid-c",
        1,
        {},
        {
            "output": {"type": "openmeter", "url": "http://om"},
            "gateway": {"ingestTokenSecretRef": {"name": "ingest", "key": "token"}},
        },
        {},
    )
    assert referenced_secrets([collector], []) == {"ingest"}
    (missing,) = resolve_namespace([collector], [], [], {"ingest": None}).collector_problems["c"]
    assert missing.reason == "SecretNotFound"
    assert missing.message.startswith(
        'Collector "c": spec.gateway.ingestTokenSecretRef names Secret "ingest"'
    )
    (no_key,) = resolve_namespace([collector], [], [], {"ingest": frozenset({"other"})}).collector_problems[
        "c"
    ]
    assert no_key.reason == "SecretKeyNotFound"
    assert "fix spec.gateway.ingestTokenSecretRef.key" in no_key.message
    assert (
        resolve_namespace([collector], [], [], {"ingest": frozenset({"token"})}).collector_problems["c"] == []
    )


def test_rendered_configs_round_trip_through_yaml() -> None:
    rendered = children(spec(ingestTokenSecretRef={"name": "ingest", "key": "token"}))
    gateway_yaml = yaml.safe_load(rendered["ConfigMap"]["data"]["gateway.yaml"])
    assert gateway_yaml["ingestTokenFile"] == TOKEN_FILE


def test_a_lago_subscription_expression_that_cannot_run_is_a_problem_on_the_collector() -> None:
    def lago_collector(expression: str) -> ObjectView:
        output = {
            "type": "lago",
            "url": "https://lago/api/v1",
            "credentialsSecretRef": {"name": "lago", "key": "key"},
            "lago": {"subscriptionIdExpression": expression},
        }
        return ObjectView("Collector", "ns", "c", "uid-c", 1, {}, {"output": output}, {})

    secrets = {"lago": frozenset({"key"})}
    good = resolve_namespace([lago_collector("event.subject + '-gpu'")], [], [], secrets)
    assert good.collector_problems["c"] == []
    (typo,) = resolve_namespace([lago_collector("evnt.subject")], [], [], secrets).collector_problems["c"]
    assert typo.reason == "InvalidExpression"
    assert typo.message.startswith('Collector "c": spec.output.lago.subscriptionIdExpression')
    assert "evnt" in typo.message
