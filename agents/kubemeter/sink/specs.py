"""Request validators built from the published OpenAPI specs (vendored in ``tests/support/specs``).

Optional at run time (``kubemeter sink --spec-dir``): the tests turn it on so every payload a sink
sends is checked against the real API's contract. Needs the ``dev`` extras (openapi-schema-validator).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

OPENMETER_SPEC = "openmeter-openapi.yaml"
FLEXPRICE_SPEC = "flexprice-openapi.json"
LAGO_SPEC = "lago-openapi.yaml"
CLOUDEVENTS_SCHEMA = "cloudevents-1.0.schema.json"


class RequestValidator:
    """Validates one request body shape; ``problems`` lists what is wrong (empty when valid)."""

    def __init__(self, validator: Any) -> None:
        self._validator = validator

    def problems(self, document: Any, limit: int = 5) -> list[str]:
        found: list[str] = []
        for error in self._validator.iter_errors(document):
            where = "/".join(str(part) for part in error.absolute_path) or "(body)"
            found.append(f"{where}: {error.message}")
            if len(found) >= limit:
                break
        return found


@dataclass(frozen=True)
class SpecValidators:
    openmeter_batch: RequestValidator
    openmeter_event: RequestValidator
    flexprice_bulk: RequestValidator
    flexprice_event: RequestValidator
    lago_batch: RequestValidator
    lago_event: RequestValidator
    cloudevent: RequestValidator


def _load(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; point --spec-dir at the folder with the billing API specs"
        )
    if path.suffix == ".json":
        return json.loads(path.read_text())
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(), Loader=loader)


def load_spec_validators(spec_dir: Path) -> SpecValidators:
    try:
        from jsonschema import Draft7Validator
        from openapi_schema_validator import OAS30Validator, OAS31Validator
        from referencing import Registry, Resource
        from referencing.jsonschema import DRAFT4, DRAFT202012
    except ImportError as error:  # pragma: no cover - depends on the install
        raise RuntimeError("spec validation needs the dev extras: pip install 'kubemeter[dev]'") from error

    openmeter = _load(spec_dir / OPENMETER_SPEC)
    flexprice = _load(spec_dir / FLEXPRICE_SPEC)
    lago = _load(spec_dir / LAGO_SPEC)
    cloudevents = _load(spec_dir / CLOUDEVENTS_SCHEMA)
    registry: Any = (
        Registry()
        .with_resource("urn:openmeter", Resource.from_contents(openmeter, default_specification=DRAFT4))
        .with_resource("urn:flexprice", Resource.from_contents(flexprice, default_specification=DRAFT4))
        .with_resource("urn:lago", Resource.from_contents(lago, default_specification=DRAFT202012))
    )

    def oas30(schema: dict[str, Any]) -> RequestValidator:
        return RequestValidator(
            OAS30Validator(schema, registry=registry, format_checker=OAS30Validator.FORMAT_CHECKER)
        )

    def oas31(schema: dict[str, Any]) -> RequestValidator:
        return RequestValidator(
            OAS31Validator(schema, registry=registry, format_checker=OAS31Validator.FORMAT_CHECKER)
        )

    ingest = openmeter["paths"]["/api/v1/events"]["post"]["requestBody"]["content"]
    bulk = flexprice["paths"]["/events/bulk"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    single = flexprice["paths"]["/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    lago_batch = lago["paths"]["/events/batch"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    lago_single = lago["paths"]["/events"]["post"]["requestBody"]["content"]["application/json"]["schema"]

    def rebase(schema: dict[str, Any], urn: str) -> dict[str, Any]:
        # Local "#/..." references in an extracted schema point into the whole document.
        text = json.dumps(schema).replace('"$ref": "#/', f'"$ref": "{urn}#/')
        rebased: dict[str, Any] = json.loads(text)
        return rebased

    return SpecValidators(
        openmeter_batch=oas30(
            rebase(ingest["application/cloudevents-batch+json"]["schema"], "urn:openmeter")
        ),
        openmeter_event=oas30(rebase(ingest["application/cloudevents+json"]["schema"], "urn:openmeter")),
        flexprice_bulk=oas30(rebase(bulk, "urn:flexprice")),
        flexprice_event=oas30(rebase(single, "urn:flexprice")),
        lago_batch=oas31(rebase(lago_batch, "urn:lago")),
        lago_event=oas31(rebase(lago_single, "urn:lago")),
        cloudevent=RequestValidator(
            Draft7Validator(cloudevents, format_checker=Draft7Validator.FORMAT_CHECKER)
        ),
    )
