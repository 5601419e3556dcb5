"""Every example in examples/ is valid as the operator sees it: specs, CEL, Secret keys, bindings."""

from __future__ import annotations

from pathlib import Path

import yaml
from kubemeter_operator.resolve import ObjectView, resolve_namespace

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def test_the_examples_resolve_without_a_single_problem() -> None:
    objects: dict[str, list[ObjectView]] = {"Collector": [], "Pipeline": [], "Meter": []}
    secrets: dict[str, frozenset[str] | None] = {}
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for body in yaml.safe_load_all(path.read_text()):
            body["metadata"].setdefault("uid", f"uid-{body['metadata']['name']}")
            if body["kind"] == "Secret":
                secrets[body["metadata"]["name"]] = frozenset(body["stringData"])
            else:
                objects[body["kind"]].append(ObjectView.from_body(body))
    result = resolve_namespace(objects["Collector"], objects["Pipeline"], objects["Meter"], secrets)
    assert {k: v for k, v in result.meter_problems.items() if v} == {}
    assert {k: v for k, v in result.pipeline_problems.items() if v} == {}
    assert {k: v for k, v in result.collector_problems.items() if v} == {}
    sources = {m.spec.source.chosen_names()[0] for m in result.collector_meters["chargeback"]}
    assert sources == {"allocation", "dra", "idle", "nvml", "prometheus", "runai"}
    assert sorted(result.collector_secret_names["chargeback"]) == [
        "prometheus-reader",
        "prometheus-reader",
        "runai-app",
    ]
