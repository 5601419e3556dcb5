"""Helm and kubeconform for the chart tests: render the chart, and build offline JSON schemas.

Kubernetes schemas come from the ``kubernetes-validate`` wheel. Its per-kind files carry an ``$id``
under https://kubernetes.io/api/ and reference ``/api/_definitions.json``, which resolves to that
host, so kubeconform cannot load them as they are (it reports "could not find schema"). We copy the
kinds we need with the ``$id`` dropped and the reference made relative to the copied
``_definitions.json``. Our CRDs become JSON schemas from their ``openAPIV3Schema``.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from testbed.controlplane import REPO_ROOT, tools_bin_dir
from tests.support.ci import unavailable

CHART_DIR = REPO_ROOT / "charts" / "kubemeter"
CRD_DIR = REPO_ROOT / "crds"
KUBE_VERSION = "1.36.0"


def tool(name: str) -> Path:
    path = tools_bin_dir() / name
    if not path.exists():
        unavailable(f"{name} is missing in {path.parent}; run tools/build.sh")
    return path


def helm_env(home: Path) -> dict[str, str]:
    """Helm keeps caches and config under HOME/XDG dirs; keep each test run's apart."""
    env = dict(os.environ)
    for kind in ("cache", "config", "data"):
        env[f"HELM_{kind.upper()}_HOME"] = str(home / kind)
    return env


def helm(
    *args: str, home: Path, check: bool = True, timeout_s: float = 120
) -> subprocess.CompletedProcess[str]:
    argv = [str(tool("helm")), *args]
    result = subprocess.run(argv, capture_output=True, text=True, env=helm_env(home), timeout=timeout_s)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def set_args(values: Mapping[str, Any]) -> list[str]:
    """``--set-json`` for each value, so types survive (a bare --set turns "1" into a number)."""
    args: list[str] = []
    for key, value in values.items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


def render_text(home: Path, values: Mapping[str, Any] | None = None, *extra: str) -> str:
    result = helm(
        "template",
        "km",
        str(CHART_DIR),
        "--namespace",
        "kubemeter-system",
        "--kube-version",
        KUBE_VERSION,
        *set_args(values or {}),
        *extra,
        home=home,
    )
    return result.stdout


def render(home: Path, values: Mapping[str, Any] | None = None, *extra: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(render_text(home, values, *extra)) if doc]


def find(docs: Iterable[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


# ---- offline schemas -------------------------------------------------------------------------------


def kubernetes_schema_source(strict: bool = True) -> Path:
    try:
        import kubernetes_validate
    except ImportError:
        unavailable("the kubernetes-validate wheel is missing; pip install -e '.[dev]'")
    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    folder = root / f"v{KUBE_VERSION}-local{'-strict' if strict else ''}"
    if not folder.is_dir():
        unavailable(f"kubernetes-validate has no schemas for {KUBE_VERSION} in {root}; upgrade it")
    return folder


def write_kubernetes_schemas(target: Path, strict: bool = True) -> Path:
    """Copies every per-kind schema with its references made local; returns the folder."""
    source = kubernetes_schema_source(strict)
    target.mkdir(parents=True, exist_ok=True)
    for path in source.glob("*.json"):
        if path.name == "all.json":
            continue
        text = path.read_text()
        document = json.loads(text)
        document.pop("$id", None)
        text = json.dumps(document).replace('"/api/_definitions.json#', '"_definitions.json#')
        (target / path.name).write_text(text)
    return target


def crd_json_schema(schema: Mapping[str, Any], strict: bool = True) -> dict[str, Any]:
    """An OpenAPI v3 (Kubernetes structural) schema as a JSON Schema kubeconform can use."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: crd_json_schema(child, strict) for name, child in value.items()}
        elif key in {"items", "additionalProperties"} and isinstance(value, dict):
            out[key] = crd_json_schema(value, strict)
        elif key in {"allOf", "anyOf", "oneOf"}:
            out[key] = [crd_json_schema(child, strict) for child in value]
        elif key == "not":
            out[key] = crd_json_schema(value, strict)
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if schema.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    preserve = schema.get("x-kubernetes-preserve-unknown-fields")
    if strict and "properties" in schema and "additionalProperties" not in schema and not preserve:
        out["additionalProperties"] = False
    return out


def write_crd_schemas(target: Path, crd_dir: Path = CRD_DIR, strict: bool = True) -> Path:
    """``<group>/<kind>_<version>.json`` for each served version of each CRD."""
    for path in sorted(crd_dir.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group = crd["spec"]["group"]
        kind = crd["spec"]["names"]["kind"].lower()
        for version in crd["spec"]["versions"]:
            schema = crd_json_schema(version["schema"]["openAPIV3Schema"], strict)
            # apiVersion, kind and metadata are checked by the API server, not by the CRD schema
            schema.setdefault("properties", {}).setdefault("metadata", {"type": "object"})
            out = target / group / f"{kind}_{version['name']}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(schema, indent=1))
    return target


def kubeconform(
    manifests: str, kubernetes_schemas: Path, crd_schemas: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    argv = [
        str(tool("kubeconform")),
        "-strict",
        "-summary",
        "-output",
        "json",
        "-schema-location",
        f"{kubernetes_schemas}/{{{{.ResourceKind}}}}{{{{.KindSuffix}}}}.json",
        "-schema-location",
        f"{crd_schemas}/{{{{.Group}}}}/{{{{.ResourceKind}}}}_{{{{.ResourceAPIVersion}}}}.json",
        *extra,
        "-",
    ]
    return subprocess.run(argv, input=manifests, capture_output=True, text=True, timeout=120)
