"""The spec models refuse what the CRDs refuse, with the same messages."""

from __future__ import annotations

from typing import Any

import pytest
from kubemeter.api.collector import CollectorSpec
from kubemeter.api.common import quantity_to_bytes
from kubemeter.api.meter import MeterSpec
from kubemeter.api.pipeline import PipelineSpec, ProcessorSpec
from kubemeter.api.rendered import AgentConfig
from pydantic import ValidationError

GPU_METER: dict[str, Any] = {
    "eventType": "gpu-seconds",
    "unit": "gpu-seconds",
    "source": {"allocation": {"resource": "nvidia.com/gpu"}},
}


def test_meter_defaults_bill_requests_per_minute_to_the_namespace() -> None:
    spec = MeterSpec.model_validate(GPU_METER)
    assert spec.window_seconds == 60
    assert spec.source.allocation is not None and spec.source.allocation.basis.value == "requests"
    assert spec.subject.expression == "namespace.metadata.name"
    assert spec.source.summary() == "allocation/nvidia.com/gpu"


def test_meter_wire_names_are_camel_case() -> None:
    wire = MeterSpec.model_validate(GPU_METER).to_wire()
    assert wire["eventType"] == "gpu-seconds" and wire["windowSeconds"] == 60


@pytest.mark.parametrize(
    ("source", "fragment"),
    [
        ({}, "set exactly one of allocation, dra, idle, kubeletUsage, nvml, prometheus or runai"),
        (
            {"allocation": {"resource": "cpu"}, "nvml": {"metric": "energy"}},
            "(found allocation, nvml)",
        ),
    ],
)
def test_a_meter_needs_exactly_one_source(source: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        MeterSpec.model_validate({**GPU_METER, "source": source})


def test_window_must_divide_a_day() -> None:
    with pytest.raises(ValidationError, match="must divide a day"):
        MeterSpec.model_validate({**GPU_METER, "windowSeconds": 7 * 60 + 1})


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        MeterSpec.model_validate({**GPU_METER, "windowSecs": 60})


@pytest.mark.parametrize(
    ("processor", "fragment"),
    [
        ({}, "set exactly one of filter, set, drop or rename"),
        ({"filter": "true", "drop": ["team"]}, "found filter, drop"),
        ({"drop": ["value"]}, "value are required in every event"),
        ({"rename": {"team": "unit"}}, "unit are required in every event"),
    ],
)
def test_processor_rules(processor: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        ProcessorSpec.model_validate(processor)


def test_pipeline_needs_meters_or_a_selector_not_both() -> None:
    with pytest.raises(ValidationError, match="set exactly one of meters"):
        PipelineSpec.model_validate({"collectorRef": "c"})
    with pytest.raises(ValidationError, match="set exactly one of meters"):
        PipelineSpec.model_validate({"collectorRef": "c", "meters": ["a"], "meterSelector": {}})


def test_lago_needs_credentials_and_headers_never_carry_them() -> None:
    with pytest.raises(ValidationError, match="credentialsSecretRef is required for type lago"):
        CollectorSpec.model_validate({"output": {"type": "lago", "url": "https://api.getlago.com"}})
    with pytest.raises(ValidationError, match="must not carry credentials"):
        CollectorSpec.model_validate(
            {"output": {"type": "openmeter", "url": "http://om", "headers": {"Authorization": "Bearer x"}}}
        )


def test_collector_defaults_keep_the_buffer_and_block_when_full() -> None:
    spec = CollectorSpec.model_validate({"output": {"type": "openmeter", "url": "http://om"}})
    assert spec.buffer.on_delete.value == "Retain"
    assert spec.buffer.when_full.value == "Block"
    assert spec.buffer.size == "10Gi"
    assert spec.gateway.replicas == 1
    assert spec.agent.resources.requests == {"cpu": "50m", "memory": "64Mi"}


@pytest.mark.parametrize(
    ("quantity", "expected_bytes"),
    [("10Gi", 10 * 2**30), ("1.5Ki", 1536), ("500M", 500_000_000), (4096, 4096), ("1e3", 1000)],
)
def test_quantities_in_bytes(quantity: int | str, expected_bytes: int) -> None:
    assert quantity_to_bytes(quantity) == expected_bytes


def test_bad_quantity_names_the_fix() -> None:
    with pytest.raises(ValidationError, match="not a Kubernetes quantity; write for example 10Gi"):
        CollectorSpec.model_validate(
            {"output": {"type": "openmeter", "url": "http://om"}, "buffer": {"size": "10GB"}}
        )


def test_agent_config_round_trips_through_yaml() -> None:
    config = AgentConfig(
        cluster="prod",
        collector="c",
        namespace="ns",
        gateway_url="http://c-gateway.ns.svc:8480",
        spool_dir="/var/lib/kubemeter/spool",
        checkpoint_dir="/var/lib/kubemeter/checkpoints",
    )
    assert AgentConfig.from_yaml(config.to_yaml()) == config
    assert "gatewayUrl: http://c-gateway.ns.svc:8480" in config.to_yaml()
