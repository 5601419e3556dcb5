"""``python -m kubemeter_operator.docgen``: docs/crd-reference.md from the CRD YAML in crds/.

The CRDs are generated from the models, so the reference follows them without a word written twice:
every field with its type, default, constraints and description, the CEL rules with their messages,
and the printer columns. ``--check`` fails when the checked-in page is stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from kubemeter_operator.crdgen import CRD_DIR

REFERENCE_PATH = CRD_DIR.parent / "docs" / "crd-reference.md"
API_GROUP_SUFFIX = ".kubemeter.io.yaml"
KIND_ORDER = ("Collector", "Meter", "Pipeline")
SKIPPED_TOP_LEVEL = {"apiVersion", "kind", "metadata"}

Schema = Mapping[str, Any]


def _one_line(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(", ", ": "))
    return f"`{text}`".replace("|", "\\|")


def type_name(schema: Schema) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        return "int or string"
    kind = str(schema.get("type", "any"))
    if kind == "array" and isinstance(schema.get("items"), Mapping):
        return f"[]{type_name(schema['items'])}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), Mapping):
        return f"map[string]{type_name(schema['additionalProperties'])}"
    if schema.get("format"):
        return f"{kind} ({schema['format']})"
    return kind


def constraints(schema: Schema) -> list[str]:
    found = []
    if "enum" in schema:
        found.append("one of " + ", ".join(_code(v) for v in schema["enum"]))
    for key, label in (
        ("minimum", "≥"),
        ("exclusiveMinimum", ">"),
        ("maximum", "≤"),
        ("minLength", "min length"),
        ("maxLength", "max length"),
        ("minItems", "min items"),
        ("maxItems", "max items"),
        ("maxProperties", "max entries"),
    ):
        if key in schema and schema[key] is not False:
            value = schema[key]
            if key == "exclusiveMinimum" and value is True:
                continue
            found.append(f"{label} {value}")
    if "pattern" in schema:
        found.append(f"pattern {_code(schema['pattern'])}")
    for rule in schema.get("x-kubernetes-validations") or []:
        message = rule.get("message")
        found.append(_one_line(message) if message else f"rule {_code(_one_line(rule['rule']))}")
    return found


def fields(schema: Schema, path: str = "", required: bool = False) -> Iterator[tuple[str, Schema, bool]]:
    """(dotted path, schema, required) for every field below ``schema``, depth first."""
    if path:
        yield path, schema, required
    needed = set(schema.get("required") or [])
    for name, child in (schema.get("properties") or {}).items():
        if not path and name in SKIPPED_TOP_LEVEL:
            continue
        yield from fields(child, f"{path}.{name}" if path else name, name in needed)
    items = schema.get("items")
    if isinstance(items, Mapping) and items.get("properties"):
        yield from fields_below(items, f"{path}[]")
    values = schema.get("additionalProperties")
    if isinstance(values, Mapping) and values.get("properties"):
        yield from fields_below(values, f"{path}[*]")


def fields_below(schema: Schema, path: str) -> Iterator[tuple[str, Schema, bool]]:
    needed = set(schema.get("required") or [])
    for name, child in (schema.get("properties") or {}).items():
        yield from fields(child, f"{path}.{name}", name in needed)


def rule_lines(schema: Schema) -> list[str]:
    rules = schema.get("x-kubernetes-validations") or []
    lines = [f"- Rule: {_one_line(rule.get('message') or rule['rule'])}" for rule in rules]
    return [*lines, ""] if lines else []


def kind_section(crd: Schema) -> list[str]:
    spec = crd["spec"]
    names = spec["names"]
    version = spec["versions"][0]
    root: Schema = version["schema"]["openAPIV3Schema"]
    lines = [
        f"## {names['kind']}",
        "",
        f"`{spec['group']}/{version['name']}`, {spec['scope'].lower()}; "
        f"`kubectl get {names['plural']}`"
        + (
            f" (short: {', '.join(f'`{n}`' for n in names.get('shortNames') or [])})"
            if names.get("shortNames")
            else ""
        )
        + ".",
        "",
        _one_line(root.get("description", "")),
        "",
    ]
    columns = version.get("additionalPrinterColumns") or []
    if columns:
        lines += [
            "`kubectl get` shows: " + ", ".join(f"**{c['name']}** ({_code(c['jsonPath'])})" for c in columns),
            "",
        ]
    lines += rule_lines(root)
    for top in ("spec", "status"):
        top_schema = (root.get("properties") or {}).get(top)
        if not top_schema:
            continue
        lines += [f"### {names['kind']} {top}", "", _one_line(top_schema.get("description", "")), ""]
        lines += rule_lines(top_schema)
        lines += ["| field | type | default | description |", "|---|---|---|---|"]
        for path, schema, required in fields(top_schema):
            name = f"`{path}`" + (" (required)" if required else "")
            default = _code(schema["default"]) if "default" in schema else ""
            description = _one_line(schema.get("description", ""))
            extra = constraints(schema)
            if extra:
                description += (" " if description else "") + "*" + "; ".join(extra) + ".*"
            lines.append(f"| {name} | {type_name(schema)} | {default} | {description} |")
        lines.append("")
    return lines


def load_crds(crd_dir: Path = CRD_DIR) -> list[Schema]:
    crds = [yaml.safe_load(path.read_text()) for path in sorted(crd_dir.glob(f"*{API_GROUP_SUFFIX}"))]
    order = {kind: index for index, kind in enumerate(KIND_ORDER)}
    return sorted(crds, key=lambda crd: order.get(crd["spec"]["names"]["kind"], len(order)))


def render(crd_dir: Path = CRD_DIR) -> str:
    crds = load_crds(crd_dir)
    lines = [
        "# CRD reference",
        "",
        "<!-- Generated by `python -m kubemeter_operator.docgen` from crds/; do not edit. -->",
        "",
        "Every field of the kubemeter custom resources, as the API server validates them. "
        "`kubectl explain <kind>.spec` shows the same descriptions in the cluster.",
        "",
        *(f"- [{crd['spec']['names']['kind']}](#{crd['spec']['names']['kind'].lower()})" for crd in crds),
        "",
    ]
    for crd in crds:
        lines += kind_section(crd)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubemeter_operator.docgen", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the checked-in page is stale")
    parser.add_argument("--output", type=Path, default=REFERENCE_PATH)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is stale; run python -m kubemeter_operator.docgen", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
