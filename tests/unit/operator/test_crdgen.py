"""The CRDs are generated from the models: complete, structural, and checked in as generated."""

from __future__ import annotations

from typing import Any

import yaml
from kubemeter_operator import crdgen
from kubemeter_operator.resources import COLLECTOR, METER, PIPELINE


def walk(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for name, child in (schema.get("properties") or {}).items():
        found += walk(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        found += walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        found += walk(schema["additionalProperties"], f"{path}[*]")
    return found


def root_schema(resource: Any) -> dict[str, Any]:
    crd = crdgen.crd_for(resource)
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_checked_in_crds_match_the_models() -> None:
    """Fails when a model changed without `make crds` (python -m kubemeter_operator.crdgen)."""
    for name, text in crdgen.render_all().items():
        assert (crdgen.CRD_DIR / name).read_text() == text, f"crds/{name} is stale; run make crds"


def test_every_field_has_a_description() -> None:
    for resource in (METER, COLLECTOR, PIPELINE):
        for path, schema in walk(root_schema(resource)):
            if path and not path.endswith(("[]", "[*]")) and path != ".metadata":
                assert schema.get("description"), f"{resource.kind}{path} has no description"


def test_schemas_are_structural() -> None:
    forbidden = {"$ref", "$defs", "title", "propertyNames", "patternProperties", "const", "oneOf", "allOf"}
    for resource in (METER, COLLECTOR, PIPELINE):
        for path, schema in walk(root_schema(resource)):
            assert not forbidden & set(schema), f"{resource.kind}{path} uses {forbidden & set(schema)}"
            assert "type" in schema or schema.get("x-kubernetes-int-or-string"), f"{resource.kind}{path}"
            if "anyOf" in schema:
                assert schema["x-kubernetes-int-or-string"] is True


def test_exactly_one_source_is_a_cel_rule_with_a_fix() -> None:
    source = root_schema(METER)["properties"]["spec"]["properties"]["source"]
    (rule,) = source["x-kubernetes-validations"]
    assert rule["rule"].endswith(".filter(x, x).size() == 1")
    assert (
        rule["message"]
        == "spec.source: set exactly one of allocation, dra, idle, kubeletUsage, nvml, prometheus or runai"
    )


def test_defaults_and_enums_live_in_the_schema() -> None:
    spec = root_schema(COLLECTOR)["properties"]["spec"]["properties"]
    buffer = spec["buffer"]["properties"]
    assert buffer["whenFull"]["enum"] == ["Block", "DropOldest"]
    assert buffer["whenFull"]["default"] == "Block"
    assert buffer["onDelete"]["default"] == "Retain"
    output_types = ["openmeter", "flexprice", "lago", "cloudevents", "kafka"]
    assert spec["output"]["properties"]["type"]["enum"] == output_types
    assert spec["output"]["properties"]["url"]["format"] == "uri"
    assert spec["agent"]["default"]["resources"]["requests"] == {"cpu": "50m", "memory": "64Mi"}


def test_names_status_and_columns() -> None:
    crd = crdgen.crd_for(METER)
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["mtr"] and names["categories"] == ["kubemeter"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [column["name"] for column in version["additionalPrinterColumns"]]
    assert columns == ["Type", "Source", "Unit", "Window", "Collectors", "Ready", "Reason", "Age"]
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]
    collector_status = root_schema(COLLECTOR)["properties"]["status"]["properties"]
    assert {"observedGeneration", "agents", "buffer", "deliveredEvents", "deadLetteredEvents"} <= set(
        collector_status
    )


def test_generated_yaml_has_no_anchors() -> None:
    for text in crdgen.render_all().values():
        assert "&id" not in text and "*id" not in text
        yaml.safe_load(text)


def test_check_mode_passes_on_the_checked_in_files() -> None:
    assert crdgen.main(["--check"]) == 0
