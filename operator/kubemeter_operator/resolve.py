"""From the Meters, Pipelines and Collectors of one namespace to what each Collector runs, and to what
is wrong with each object. Pure: the caller passes in what it read (objects, Secrets)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubemeter.api.collector import CollectorSpec
from kubemeter.api.common import LabelSelector, LabelSelectorOperator, SecretKeyRef
from kubemeter.api.meter import MeterSpec
from kubemeter.api.pipeline import PipelineSpec
from kubemeter.api.rendered import ResolvedMeter
from pydantic import ValidationError

from kubemeter_operator.builders.configmap import (
    GENERATED_TOKEN_KEY,
    generated_token_secret_name,
    secret_dir,
)
from kubemeter_operator.celcheck import (
    DEVICE_VARIABLES,
    METER_VARIABLES,
    PROCESSOR_VARIABLES,
    expression_error,
)


@dataclass(frozen=True)
class ObjectView:
    """What the operator knows of one custom resource."""

    kind: str
    namespace: str
    name: str
    uid: str
    generation: int
    labels: Mapping[str, str]
    spec: Mapping[str, Any]
    status: Mapping[str, Any]
    deleting: bool = False

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> ObjectView:
        meta = body.get("metadata", {})
        return cls(
            kind=body.get("kind", ""),
            namespace=meta.get("namespace", ""),
            name=meta.get("name", ""),
            uid=meta.get("uid", ""),
            generation=int(meta.get("generation", 0) or 0),
            labels=dict(meta.get("labels") or {}),
            spec=dict(body.get("spec") or {}),
            status=dict(body.get("status") or {}),
            deleting=bool(meta.get("deletionTimestamp")),
        )

    def event_target(self) -> dict[str, Any]:
        """The body kopf needs to post an Event about this object."""
        return {
            "apiVersion": "kubemeter.io/v1alpha1",
            "kind": self.kind,
            "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.uid},
        }


@dataclass(frozen=True, order=True)
class Problem:
    """Something a person must fix. ``reason`` is CamelCase; ``message`` names the field and the fix."""

    reason: str
    message: str


SecretKeys = Mapping[str, frozenset[str] | None]  # Secret name -> its keys, or None when it is missing


def validation_message(kind: str, name: str, error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "spec"
    return f'{kind} "{name}": spec.{where}: {first["msg"]}'


def selector_matches(selector: LabelSelector, labels: Mapping[str, str]) -> bool:
    if any(labels.get(key) != value for key, value in selector.match_labels.items()):
        return False
    for requirement in selector.match_expressions:
        present = requirement.key in labels
        value = labels.get(requirement.key)
        if requirement.operator is LabelSelectorOperator.IN and value not in requirement.values:
            return False
        if requirement.operator is LabelSelectorOperator.NOT_IN and present and value in requirement.values:
            return False
        if requirement.operator is LabelSelectorOperator.EXISTS and not present:
            return False
        if requirement.operator is LabelSelectorOperator.DOES_NOT_EXIST and present:
            return False
    return True


def parse_meter(meter: ObjectView) -> tuple[MeterSpec | None, list[Problem]]:
    """The Meter's spec and every problem only the operator can see (CEL, parse errors)."""
    try:
        spec = MeterSpec.model_validate(meter.spec)
    except ValidationError as error:
        return None, [Problem("InvalidSpec", validation_message("Meter", meter.name, error))]
    problems: list[Problem] = []
    expressions = {"spec.subject.expression": spec.subject.expression}
    expressions |= {f"spec.dimensions.{key}": value for key, value in spec.dimensions.items()}
    for where, expression in expressions.items():
        failure = expression_error(expression, METER_VARIABLES)
        if failure:
            problems.append(Problem("InvalidExpression", f'Meter "{meter.name}": {where} {failure}'))
    selectors = {
        "spec.source.dra.selector": spec.source.dra.selector if spec.source.dra else None,
        "spec.source.idle.devices.selector": (
            spec.source.idle.devices.selector if spec.source.idle and spec.source.idle.devices else None
        ),
    }
    for where, selector in selectors.items():
        failure = expression_error(selector, DEVICE_VARIABLES) if selector else None
        if failure:
            problems.append(Problem("InvalidExpression", f'Meter "{meter.name}": {where} {failure}'))
    return spec, problems


def source_secret(spec: MeterSpec) -> tuple[str, str, list[frozenset[str]]] | None:
    """The Secret a Meter's source reads: (field, Secret name, acceptable key sets), or None."""
    runai, prometheus = spec.source.runai, spec.source.prometheus
    if runai is not None:
        credentials = frozenset({"clientId", "clientSecret"}), frozenset({"appId", "appSecret"})
        return "spec.source.runai.credentialsSecretRef", runai.credentials_secret_ref.name, list(credentials)
    if prometheus is not None and prometheus.bearer_token_secret_ref is not None:
        reference = prometheus.bearer_token_secret_ref
        return "spec.source.prometheus.bearerTokenSecretRef", reference.name, [frozenset({reference.key})]
    if prometheus is not None and prometheus.basic_auth_secret_ref is not None:
        name = prometheus.basic_auth_secret_ref.name
        return "spec.source.prometheus.basicAuthSecretRef", name, [frozenset({"username", "password"})]
    return None


def collector_secrets(collectors: Sequence[ObjectView]) -> dict[str, str]:
    """Secret name -> what it holds for which Collector: the billing API key, the ingest token
    (named or generated) and the Kafka credentials. No Meter may read these: its agents would send
    them where the Meter says."""
    held: dict[str, str] = {}
    for collector in sorted(collectors, key=lambda item: item.name):
        output = (collector.spec.get("output") or {}).get("credentialsSecretRef")
        token = (collector.spec.get("gateway") or {}).get("ingestTokenSecretRef")
        if isinstance(output, Mapping) and output.get("name"):
            held.setdefault(str(output["name"]), f'Collector "{collector.name}"\'s billing API key')
        token_name = token.get("name") if isinstance(token, Mapping) else None
        token_name = token_name or generated_token_secret_name(collector.name)
        held.setdefault(str(token_name), f'Collector "{collector.name}"\'s ingest token')
        kafka = (collector.spec.get("output") or {}).get("kafka") or {}
        for what, reference in (
            ("Kafka SASL credentials", (kafka.get("sasl") or {}).get("secretRef")),
            ("Kafka client certificate", (kafka.get("tls") or {}).get("clientCertificateSecretRef")),
            ("Kafka CA bundle", (kafka.get("tls") or {}).get("caSecretRef")),
        ):
            if isinstance(reference, Mapping) and reference.get("name"):
                held.setdefault(str(reference["name"]), f'Collector "{collector.name}"\'s {what}')
    return held


def meter_secret_problems(
    meter: ObjectView, spec: MeterSpec, secrets: SecretKeys, held: Mapping[str, str] | None = None
) -> list[Problem]:
    needed = source_secret(spec)
    if needed is None:
        return []
    where, name, key_sets = needed
    if held and name in held:
        return [
            Problem(
                "ForbiddenSecret",
                f'Meter "{meter.name}": {where} names Secret "{name}", which holds {held[name]}; a Meter '
                "may not read it (its agents would send it to the Meter's URL) and it is not mounted; "
                "name a Secret of its own",
            )
        ]
    wanted = " or ".join(" and ".join(sorted(keys)) for keys in key_sets)
    keys = secrets.get(name)
    if keys is None:
        return [
            Problem(
                "SecretNotFound",
                f'Meter "{meter.name}": {where} names Secret "{name}", which does not exist in namespace '
                f'"{meter.namespace}"; create it with key(s) {wanted}',
            )
        ]
    if not any(key_set <= keys for key_set in key_sets):
        return [
            Problem(
                "SecretKeyNotFound",
                f'Meter "{meter.name}": Secret "{name}" needs key(s) {wanted} '
                f"(it has: {', '.join(sorted(keys)) or 'none'}); add them",
            )
        ]
    return []


def parse_pipeline(pipeline: ObjectView) -> tuple[PipelineSpec | None, list[Problem]]:
    try:
        spec = PipelineSpec.model_validate(pipeline.spec)
    except ValidationError as error:
        return None, [Problem("InvalidSpec", validation_message("Pipeline", pipeline.name, error))]
    problems: list[Problem] = []
    for index, processor in enumerate(spec.processors):
        expressions: dict[str, str] = {}
        if processor.filter is not None:
            expressions[f"spec.processors[{index}].filter"] = processor.filter
        for key, expression in (processor.set or {}).items():
            expressions[f"spec.processors[{index}].set.{key}"] = expression
        for where, expression in expressions.items():
            failure = expression_error(expression, PROCESSOR_VARIABLES)
            if failure:
                problems.append(
                    Problem("InvalidExpression", f'Pipeline "{pipeline.name}": {where} {failure}')
                )
    return spec, problems


def bound_meter_names(spec: PipelineSpec, meters: Iterable[ObjectView]) -> list[str]:
    """Names the Pipeline binds: listed names (existing or not) or the selector's matches."""
    if spec.meters is not None:
        return list(dict.fromkeys(spec.meters))
    assert spec.meter_selector is not None
    return sorted(meter.name for meter in meters if selector_matches(spec.meter_selector, meter.labels))


@dataclass
class NamespaceResolution:
    """Everything the operator concludes about one namespace."""

    collector_specs: dict[str, CollectorSpec] = field(default_factory=dict)
    collector_meters: dict[str, list[ResolvedMeter]] = field(default_factory=dict)
    collector_problems: dict[str, list[Problem]] = field(default_factory=dict)
    collector_secret_names: dict[str, list[str]] = field(default_factory=dict)  # mounted into agents
    pipeline_problems: dict[str, list[Problem]] = field(default_factory=dict)
    pipeline_meters: dict[str, list[str]] = field(default_factory=dict)
    meter_problems: dict[str, list[Problem]] = field(default_factory=dict)
    meter_collectors: dict[str, list[str]] = field(default_factory=dict)
    meter_sources: dict[str, str] = field(default_factory=dict)


def referenced_secrets(collectors: Sequence[ObjectView], meters: Sequence[ObjectView]) -> set[str]:
    """Secret names the resolution will ask about, so the caller can read exactly those."""
    names: set[str] = set()
    for collector in collectors:
        kafka = (collector.spec.get("output") or {}).get("kafka") or {}
        references = [
            (collector.spec.get("output") or {}).get("credentialsSecretRef"),
            (collector.spec.get("gateway") or {}).get("ingestTokenSecretRef")
            or {"name": generated_token_secret_name(collector.name)},
            (kafka.get("sasl") or {}).get("secretRef"),
            (kafka.get("tls") or {}).get("caSecretRef"),
            (kafka.get("tls") or {}).get("clientCertificateSecretRef"),
        ]
        names.update(r["name"] for r in references if isinstance(r, Mapping) and r.get("name"))
    for meter in meters:
        source = meter.spec.get("source") or {}
        references = [
            (source.get("runai") or {}).get("credentialsSecretRef"),
            (source.get("prometheus") or {}).get("bearerTokenSecretRef"),
            (source.get("prometheus") or {}).get("basicAuthSecretRef"),
        ]
        names.update(r["name"] for r in references if isinstance(r, Mapping) and r.get("name"))
    return names


def _collector_secret_problems(
    collector: ObjectView, spec: CollectorSpec, secrets: SecretKeys
) -> list[Problem]:
    problems = []
    kafka_files = spec.output.kafka.secret_files() if spec.output.kafka else []
    token = spec.gateway.ingest_token_secret_ref
    generated = generated_token_secret_name(collector.name)
    if token is None and generated in secrets:  # the operator creates it; checked once it tried
        token = SecretKeyRef(name=generated, key=GENERATED_TOKEN_KEY)
    for field_path, reference in (
        ("spec.output.credentialsSecretRef", spec.output.credentials_secret_ref),
        ("spec.gateway.ingestTokenSecretRef", token),
        *((where, ref) for _, where, ref in kafka_files),
    ):
        if reference is None:
            continue
        keys = secrets.get(reference.name)
        if keys is None:
            problems.append(
                Problem(
                    "SecretNotFound",
                    f'Collector "{collector.name}": {field_path} names Secret "{reference.name}", which '
                    f'does not exist in namespace "{collector.namespace}"; create it with key '
                    f'"{reference.key}"',
                )
            )
        elif reference.key not in keys:
            problems.append(
                Problem(
                    "SecretKeyNotFound",
                    f'Collector "{collector.name}": Secret "{reference.name}" has no key "{reference.key}" '
                    f"(it has: {', '.join(sorted(keys)) or 'none'}); add the key or fix {field_path}.key",
                )
            )
    return problems


def _collector_expression_problems(collector: ObjectView, spec: CollectorSpec) -> list[Problem]:
    lago = spec.output.lago
    if lago is None or lago.subscription_id_expression is None:
        return []
    failure = expression_error(lago.subscription_id_expression, PROCESSOR_VARIABLES)
    if not failure:
        return []
    where = "spec.output.lago.subscriptionIdExpression"
    return [Problem("InvalidExpression", f'Collector "{collector.name}": {where} {failure}')]


def resolve_namespace(
    collectors: Sequence[ObjectView],
    pipelines: Sequence[ObjectView],
    meters: Sequence[ObjectView],
    secrets: SecretKeys,
) -> NamespaceResolution:
    result = NamespaceResolution()
    meters_by_name = {meter.name: meter for meter in meters}
    live_collectors = {collector.name: collector for collector in collectors}

    meter_specs: dict[str, MeterSpec] = {}
    held = collector_secrets(collectors)
    for meter in sorted(meters, key=lambda item: item.name):
        meter_spec, problems = parse_meter(meter)
        if meter_spec is not None:
            meter_specs[meter.name] = meter_spec
            result.meter_sources[meter.name] = meter_spec.source.summary()
            problems += meter_secret_problems(meter, meter_spec, secrets, held)
        result.meter_problems[meter.name] = problems
        result.meter_collectors[meter.name] = []

    for collector in sorted(collectors, key=lambda item: item.name):
        try:
            collector_spec = CollectorSpec.model_validate(collector.spec)
        except ValidationError as error:
            message = validation_message("Collector", collector.name, error)
            result.collector_problems[collector.name] = [Problem("InvalidSpec", message)]
            continue
        result.collector_specs[collector.name] = collector_spec
        result.collector_problems[collector.name] = _collector_secret_problems(
            collector, collector_spec, secrets
        ) + _collector_expression_problems(collector, collector_spec)
        result.collector_meters[collector.name] = []
        result.collector_secret_names[collector.name] = []

    bound_by: dict[tuple[str, str], str] = {}  # (collector, meter) -> the Pipeline that bound it first
    for pipeline in sorted(pipelines, key=lambda item: item.name):
        spec, problems = parse_pipeline(pipeline)
        result.pipeline_problems[pipeline.name] = problems
        result.pipeline_meters[pipeline.name] = []
        if spec is None:
            continue
        collector_name = spec.collector_ref
        if collector_name not in live_collectors:
            problems.append(
                Problem(
                    "CollectorNotFound",
                    f'Pipeline "{pipeline.name}": spec.collectorRef names Collector "{collector_name}", '
                    f'which does not exist in namespace "{pipeline.namespace}"; create it or fix '
                    "spec.collectorRef",
                )
            )
        names = bound_meter_names(spec, meters)
        result.pipeline_meters[pipeline.name] = names
        for name in names:
            if name not in meters_by_name:
                problems.append(
                    Problem(
                        "MeterNotFound",
                        f'Pipeline "{pipeline.name}": spec.meters names Meter "{name}", which does not '
                        f'exist in namespace "{pipeline.namespace}"; create it or remove it from spec.meters',
                    )
                )
        if collector_name not in result.collector_specs:
            continue  # missing or invalid Collector: reported above or on the Collector
        pipeline_broken = any(problem.reason == "InvalidExpression" for problem in problems)
        for name in names:
            bound = meters_by_name.get(name)
            if bound is None:
                continue
            first = bound_by.get((collector_name, name))
            if first is not None:
                problems.append(
                    Problem(
                        "MeterBoundTwice",
                        f'Pipeline "{pipeline.name}": Meter "{name}" is already bound to Collector '
                        f'"{collector_name}" by Pipeline "{first}"; bind each Meter once per Collector',
                    )
                )
                continue
            bound_by[(collector_name, name)] = pipeline.name
            if collector_name not in result.meter_collectors[name]:
                result.meter_collectors[name].append(collector_name)
            meter_spec = meter_specs.get(name)
            # A broken Meter or Pipeline is left out rather than run half-configured.
            if pipeline_broken or meter_spec is None or result.meter_problems[name]:
                continue
            credentials_dir = None
            needed = source_secret(meter_spec)
            if needed is not None:
                secret_name = needed[1]
                credentials_dir = secret_dir(secret_name)
                result.collector_secret_names[collector_name].append(secret_name)
            result.collector_meters[collector_name].append(
                ResolvedMeter(
                    name=name,
                    namespace=bound.namespace,
                    uid=bound.uid,
                    pipeline=pipeline.name,
                    spec=meter_spec,
                    processors=list(spec.processors),
                    credentials_dir=credentials_dir,
                )
            )

    for collector_name, problems in result.collector_problems.items():
        problems.extend(_excluded(collector_name, result, pipelines))
    for names in result.meter_collectors.values():
        names.sort()
    return result


def _excluded(
    collector_name: str, result: NamespaceResolution, pipelines: Sequence[ObjectView]
) -> list[Problem]:
    """One Collector-level problem summarising broken Pipelines and Meters bound to it."""
    broken: list[str] = []
    for pipeline in sorted(pipelines, key=lambda item: item.name):
        if pipeline.spec.get("collectorRef") != collector_name:
            continue
        if result.pipeline_problems.get(pipeline.name):
            broken.append(f'Pipeline "{pipeline.name}"')
        for meter_name in result.pipeline_meters.get(pipeline.name, []):
            if result.meter_problems.get(meter_name):
                broken.append(f'Meter "{meter_name}"')
    if not broken:
        return []
    unique = list(dict.fromkeys(broken))
    return [
        Problem(
            "InvalidBinding",
            f"{', '.join(unique)} cannot run; see their status conditions. The other Meters run normally",
        )
    ]
