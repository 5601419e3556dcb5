"""CustomResourceDefinitions generated from the pydantic models: ``python -m kubemeter_operator.crdgen``
writes ``crds/<plural>.kubemeter.io.yaml``; ``--check`` fails when the checked-in files differ.

Pydantic's JSON Schema is close to Kubernetes' structural OpenAPI v3 but not equal: references are
inlined, ``Optional`` unions collapse to the inner type, draft-2020 ``exclusiveMinimum`` numbers become
draft-4 booleans, and ``additionalProperties: false`` goes (the API server prunes and, with kubectl's
strict field validation, refuses unknown fields instead)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from kubemeter.api.common import API_GROUP, API_VERSION
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, NoDefault
from pydantic_core import core_schema

from kubemeter_operator.resources import ALL_RESOURCES, CATEGORY, COLLECTOR, CustomResource

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = REPO_ROOT / "crds"
MAX_COLLECTOR_NAME_LENGTH = 40  # children are named <collector>-gateway-<n>, Services are DNS labels

_DROPPED_KEYS = {"title", "additionalProperties", "$defs"}
# Keys in the order a reader wants them: what it is first, then constraints, then children.
_KEY_ORDER: tuple[str, ...] = ("type", "description", "default", "enum", "format", "pattern")
_KEY_ORDER += ("minLength", "maxLength", "minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")
_KEY_ORDER += ("minItems", "maxItems", "maxProperties", "anyOf", "x-kubernetes-int-or-string")
_KEY_ORDER += ("x-kubernetes-list-type", "x-kubernetes-list-map-keys", "required", "properties")
_KEY_ORDER += ("additionalProperties", "items", "x-kubernetes-validations")


class _NoAliasDumper(yaml.SafeDumper):
    """Writes shared sub-schemas out in full: kubectl and humans read the CRD, not YAML anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


class SchemaError(ValueError):
    """A model cannot be expressed as a structural schema; the message names the field."""


class _DefaultsFromFactories(GenerateJsonSchema):
    """Emit ``default`` for ``default_factory`` fields too: nested objects default to ``{}`` so the API
    server fills in their own defaults, and factories with content (resources) are written out."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is None:
            return super().get_default_value(schema)
        value = factory()  # type: ignore[call-arg]
        if isinstance(value, BaseModel):
            # in full: the API server checks a default against CEL rules before defaulting inside it
            return value.model_dump(mode="json", by_alias=True, exclude_none=True)
        if value in ([], {}):
            return NoDefault  # an empty list or map needs no default in the stored object
        return value


def structural_schema(model: type[BaseModel], path: str) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of ``model``; ``path`` (e.g. ``spec``) appears in errors."""
    raw = model.model_json_schema(by_alias=True, mode="validation", schema_generator=_DefaultsFromFactories)
    definitions = raw.get("$defs", {})
    return _convert(raw, definitions, path)


def _inline_reference(node: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    reference = node.get("$ref")
    if reference is None:
        return node
    target = definitions[reference.rsplit("/", 1)[-1]]
    siblings = {key: value for key, value in node.items() if key != "$ref"}
    return {**target, **siblings}  # the field's own description wins over the model docstring


def _collapse_optional(node: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    variants = node.get("anyOf")
    if variants is None:
        return node
    if node.get("x-kubernetes-int-or-string"):
        return {**node, "anyOf": [{"type": "integer"}, {"type": "string"}]}
    concrete = [variant for variant in variants if variant != {"type": "null"}]
    if len(concrete) != 1:
        raise SchemaError(f"union {variants} has no structural form; use optional fields and a CEL rule")
    inner = _inline_reference(concrete[0], definitions)
    outer = {key: value for key, value in node.items() if key != "anyOf"}
    if outer.get("default", ...) is None:
        del outer["default"]
    return {**inner, **outer}


def _convert(node: dict[str, Any], definitions: dict[str, Any], path: str) -> dict[str, Any]:
    node = _collapse_optional(_inline_reference(node, definitions), definitions)
    node = _inline_reference(node, definitions)
    converted: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS and not (key == "additionalProperties" and isinstance(value, dict)):
            continue
        if key == "properties":
            converted[key] = {}
            for name, child in value.items():
                child_schema = _convert(child, definitions, f"{path}.{name}")
                if "description" not in child_schema:
                    raise SchemaError(f"{path}.{name} has no description; add Field(description=...)")
                converted[key][name] = child_schema
        elif key == "additionalProperties":
            converted[key] = _convert(value, definitions, f"{path}[*]")
        elif key == "items":
            converted[key] = _convert(value, definitions, f"{path}[]")
        elif key == "patternProperties":
            # Structural schemas have no patternProperties: the value schema becomes
            # additionalProperties and the key pattern a CEL rule.
            ((key_pattern, value_schema),) = value.items()
            converted["additionalProperties"] = _convert(value_schema, definitions, f"{path}[*]")
            converted.setdefault("x-kubernetes-validations", []).append(_key_rule(path, key_pattern))
        elif key == "propertyNames":
            if "maxLength" in value:
                rule = _key_length_rule(path, value["maxLength"])
                converted.setdefault("x-kubernetes-validations", []).append(rule)
        elif key == "exclusiveMinimum":
            converted["minimum"], converted["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            converted["maximum"], converted["exclusiveMaximum"] = value, True
        elif key == "default" and value is None:
            continue
        else:
            converted[key] = value
    if "type" not in converted and not converted.get("x-kubernetes-int-or-string"):
        raise SchemaError(f"{path} has no type; give the field a concrete type")
    unknown = set(converted) - set(_KEY_ORDER)
    if unknown:
        raise SchemaError(
            f"{path} uses {sorted(unknown)}, which the generator does not know; extend _KEY_ORDER"
        )
    return {key: converted[key] for key in _KEY_ORDER if key in converted}


def _key_rule(path: str, pattern: str) -> dict[str, str]:
    return {
        "rule": f"self.all(key, key.matches('{pattern}'))",
        "message": f"{path}: every key must match {pattern} (a letter or _, then letters, digits or _), "
        "e.g. gpu_model; rename the offending key",
    }


def _key_length_rule(path: str, max_length: int) -> dict[str, str]:
    return {
        "rule": f"self.all(key, key.size() <= {max_length})",
        "message": f"{path}: keys are at most {max_length} characters; shorten the offending key",
    }


def _root_rules(resource: CustomResource) -> list[dict[str, str]]:
    if resource is not COLLECTOR:
        return []
    return [
        {
            "rule": f"self.metadata.name.size() <= {MAX_COLLECTOR_NAME_LENGTH}",
            "message": (
                f"metadata.name of a Collector must be at most {MAX_COLLECTOR_NAME_LENGTH} characters, "
                "because its children are named after it (<name>-gateway-0); choose a shorter name"
            ),
        }
    ]


def crd_for(resource: CustomResource) -> dict[str, Any]:
    """The CustomResourceDefinition of one kind."""
    root: dict[str, Any] = {
        "type": "object",
        "description": resource.description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": f"{API_GROUP}/{API_VERSION}"},
            "kind": {"type": "string", "description": resource.kind},
            "metadata": {"type": "object"},  # the API server allows nothing more here
            "spec": structural_schema(resource.spec_model, "spec"),
            "status": structural_schema(resource.status_model, "status"),
        },
    }
    rules = _root_rules(resource)
    if rules:
        root["x-kubernetes-validations"] = rules
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": resource.crd_name,
            "labels": {"app.kubernetes.io/name": "kubemeter", "app.kubernetes.io/part-of": "kubemeter"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": resource.kind,
                "listKind": f"{resource.kind}List",
                "plural": resource.plural,
                "singular": resource.singular,
                "shortNames": list(resource.short_names),
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [column.to_crd() for column in resource.printer_columns],
                }
            ],
        },
    }


def kopf_peering_crd() -> dict[str, Any]:
    """kopf's ClusterKopfPeering: lets two operator replicas agree which one is active."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "clusterkopfpeerings.kopf.dev"},
        "spec": {
            "group": "kopf.dev",
            "scope": "Cluster",
            "names": {
                "kind": "ClusterKopfPeering",
                "plural": "clusterkopfpeerings",
                "singular": "clusterkopfpeering",
            },
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": True,
                            "properties": {
                                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                            },
                        }
                    },
                }
            ],
        },
    }


def render_all() -> dict[str, str]:
    """File name -> YAML text for every CRD kubemeter installs."""
    header = "# Generated by `python -m kubemeter_operator.crdgen` from the pydantic models; do not edit.\n"
    files = {f"{resource.crd_name}.yaml": crd_for(resource) for resource in ALL_RESOURCES}
    files["clusterkopfpeerings.kopf.dev.yaml"] = kopf_peering_crd()
    return {
        name: header + yaml.dump(crd, Dumper=_NoAliasDumper, sort_keys=False, width=100)
        for name, crd in sorted(files.items())
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubemeter_operator.crdgen", description=__doc__)
    parser.add_argument("--output", type=Path, default=CRD_DIR, help="directory for the YAML files")
    parser.add_argument("--check", action="store_true", help="fail if the files differ from the models")
    args = parser.parse_args(argv)
    stale: list[str] = []
    for name, text in render_all().items():
        target = args.output / name
        current = target.read_text() if target.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(str(target))
        else:
            args.output.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            print(f"wrote {target}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run `make crds` and commit the result", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
