"""The configuration contract: Meter, Collector and Pipeline specs, and the files the operator renders.

These pydantic models are the single source of truth. The operator generates the CRD schemas from
them and renders :class:`AgentConfig` and :class:`GatewayConfig` into each Collector's ConfigMap; the
agent and the gateway parse those files with the same models. Field names are camelCase on the wire
(``windowSeconds``) and snake_case in Python (``window_seconds``).

Rules that span fields are written twice on purpose: as CEL (``x-kubernetes-validations``, enforced
by the API server at ``kubectl apply``) and as pydantic validators (enforced when a process parses a
rendered file). Both messages name the field and the fix. No I/O happens in this module.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "kubemeter.io"
API_VERSION = "v1alpha1"

# Where the operator mounts the rendered ConfigMap, and the file names inside it.
CONFIG_DIR = "/etc/kubemeter/config"
AGENT_CONFIG_FILENAME = "agent.yaml"
GATEWAY_CONFIG_FILENAME = "gateway.yaml"
# Secrets named by a spec are mounted as directories here, one file per key.
SECRETS_DIR = "/etc/kubemeter/secrets"
# The host's /proc, mounted read-only into agents: NVML reports host PIDs, mapped to pods through it.
HOST_PROC_DIR = "/host/proc"

# Environment the operator sets on agent pods (the config file is shared by every node).
NODE_NAME_ENV = "KUBEMETER_NODE_NAME"
POD_NAME_ENV = "KUBEMETER_POD_NAME"

# Ports. The gateway serves ingest, /healthz, /metrics and /status on one port; the agent serves
# /healthz and /metrics.
GATEWAY_PORT = 8480
AGENT_METRICS_PORT = 9464
HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"
GATEWAY_STATUS_PATH = "/status"

# Keys every usage event's data carries; processors may not drop or rename them.
PROTECTED_DATA_KEYS = ("value", "unit", "window_start", "window_end", "namespace", "pod", "node", "complete")

SECONDS_PER_DAY = 86_400
QUANTITY_PATTERN = r"^(\+)?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|([eE][-+]?[0-9]+))?$"
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)
_BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL_SUFFIXES = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_DECIMAL_SUFFIXES |= {"P": 1e15, "E": 1e18}

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # an RFC 1123 label: a Kubernetes object name
DATA_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"  # an event data key, also a valid CEL identifier
HTTP_URL_PATTERN = r"^https?://[^\s/$.?#][^\s]*$"


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, str) and not _QUANTITY_RE.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity; write for example 10Gi, 500Mi or 250m")
    return value


def quantity_to_number(value: int | str) -> float:
    """A Kubernetes quantity (``10Gi``, ``250m``, ``1e3``, ``4``) as a plain number."""
    text = str(_check_quantity(value))
    for suffix, factor in _BINARY_SUFFIXES.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    if text[-1:] in _DECIMAL_SUFFIXES and not text[-1:].isdigit():
        return float(text[:-1]) * _DECIMAL_SUFFIXES[text[-1]]
    return float(text)  # plain or exponent form


def quantity_to_bytes(value: int | str) -> int:
    """A storage quantity in bytes, rounded up (a 1.5Ki buffer holds 1536 bytes)."""
    number = quantity_to_number(value)
    return int(number) if number == int(number) else int(number) + 1


Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    Field(json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN}),
]
CelExpression = Annotated[str, Field(min_length=1, max_length=1024)]
HttpUrl = Annotated[
    str, Field(pattern=HTTP_URL_PATTERN, max_length=2048, json_schema_extra={"format": "uri"})
]
ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=NAME_PATTERN)]
DataKey = Annotated[str, Field(min_length=1, max_length=63, pattern=DATA_KEY_PATTERN)]


def cel_rules(*rules: tuple[str, str]) -> dict[str, Any]:
    """``x-kubernetes-validations`` for a model: (CEL rule, message that names the field and the fix)."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in rules]}


class SpecModel(BaseModel):
    """Base of every wire model: camelCase aliases, snake_case attributes, unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_wire(self) -> dict[str, Any]:
        """The JSON/YAML form, camelCase, without unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# ---------------------------------------------------------------------------------------------------
# Shared pieces


class LabelSelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(SpecModel):
    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "self.operator in ['In', 'NotIn'] ? has(self.values) && size(self.values) > 0 "
                ": !has(self.values) || size(self.values) == 0",
                "matchExpressions: operator In and NotIn need at least one entry in values; "
                "Exists and DoesNotExist take no values",
            )
        )
    )

    key: str = Field(min_length=1, max_length=316, description="The label key the requirement applies to.")
    operator: LabelSelectorOperator = Field(
        description="How the key relates to the values: In, NotIn, Exists or DoesNotExist."
    )
    values: list[Annotated[str, Field(max_length=63)]] = Field(
        default_factory=list,
        max_length=64,
        description="Label values; required for In and NotIn, empty for Exists and DoesNotExist.",
    )

    @model_validator(mode="after")
    def _values_match_operator(self) -> Self:
        needs_values = self.operator in (LabelSelectorOperator.IN, LabelSelectorOperator.NOT_IN)
        if needs_values != bool(self.values):
            raise ValueError(
                f"matchExpressions[key={self.key}]: operator {self.operator.value} "
                + ("needs at least one value" if needs_values else "takes no values; remove values")
            )
        return self


class LabelSelector(SpecModel):
    """A Kubernetes label selector; an empty selector matches everything."""

    match_labels: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict,
        json_schema_extra={"maxProperties": 64},
        description="Labels that must all be present with exactly these values.",
    )
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, max_length=32, description="Requirements that must all hold."
    )


class SecretKeyRef(SpecModel):
    name: ObjectName = Field(description="Name of a Secret in the same namespace as this resource.")
    key: str = Field(
        min_length=1, max_length=253, description="The key inside the Secret whose value is the credential."
    )


class SecretRef(SpecModel):
    name: ObjectName = Field(description="Name of a Secret in the same namespace as this resource.")


# ---------------------------------------------------------------------------------------------------
# Meter


class AllocationBasis(StrEnum):
    REQUESTS = "requests"
    LIMITS = "limits"


class AllocationSource(SpecModel):
    """Allocation integrated exactly from pod lifecycle timestamps: what a pod holds, not what it uses."""

    resource: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^([a-z0-9.-]+/)?[A-Za-z0-9][-A-Za-z0-9_.]*$",
        description=(
            "The resource name as it appears in a container's resources: cpu, memory, "
            "nvidia.com/gpu, a MIG profile such as nvidia.com/mig-1g.5gb, or any extended resource."
        ),
    )
    basis: AllocationBasis = Field(
        default=AllocationBasis.REQUESTS,
        description="Bill what containers request (requests) or what they are capped at (limits).",
    )


class KubeletUsageSource(SpecModel):
    """Usage from the kubelet's cumulative counters (stats/summary), per pod."""

    metric: Literal["cpu", "memory"] = Field(
        description="cpu: core-seconds from usageCoreNanoSeconds; memory: working-set byte-seconds."
    )


class NvmlSource(SpecModel):
    """Per-GPU readings from NVML on the node, attributed to the pod that holds the device."""

    metric: Literal["utilization", "memoryUsed", "energy"] = Field(
        description=(
            "utilization: busy GPU-seconds; memoryUsed: used-memory byte-seconds; energy: joules from "
            "the cumulative energy counter."
        )
    )


class PrometheusKind(StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"


class PrometheusTls(SpecModel):
    """How the agent checks the Prometheus server's certificate."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "!(has(self.caFile) && self.insecureSkipVerify)",
                "spec.source.prometheus.tls: set caFile or insecureSkipVerify, not both",
            )
        )
    )

    ca_file: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description=(
            "Path, inside the agent container, of the CA bundle that signed the server's certificate, "
            "e.g. /var/run/secrets/kubernetes.io/serviceaccount/service-ca.crt on OpenShift. Unset: "
            "the system's trusted CAs."
        ),
    )
    insecure_skip_verify: bool = Field(
        default=False, description="Do not verify the server's certificate (for tests only)."
    )

    @model_validator(mode="after")
    def _one_way(self) -> Self:
        if self.ca_file is not None and self.insecure_skip_verify:
            raise ValueError("spec.source.prometheus.tls: set caFile or insecureSkipVerify, not both")
        return self


_PROMETHEUS_CREDENTIAL_HEADERS = ("authorization", "proxy-authorization")


class PrometheusSource(SpecModel):
    """A PromQL series selector whose series carry pod and namespace labels; each agent reads only its
    node's series, as raw samples."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "!(has(self.bearerTokenSecretRef) && has(self.basicAuthSecretRef))",
                "spec.source.prometheus: set bearerTokenSecretRef or basicAuthSecretRef, not both",
            ),
            (
                "!has(self.headers) || self.headers.all(h, !(h.lowerAscii() in "
                "['authorization', 'proxy-authorization']))",
                "spec.source.prometheus.headers must not carry credentials (Authorization); name a Secret "
                "in bearerTokenSecretRef or basicAuthSecretRef instead",
            ),
        )
    )

    url: HttpUrl = Field(description="Base URL of the Prometheus HTTP API, e.g. http://prometheus:9090.")
    query: str = Field(
        min_length=1,
        max_length=4096,
        description=(
            'A PromQL series selector, e.g. DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{pod!=""}; no rate(), '
            "increase() or aggregation (record those with a recording rule and select the result). The "
            "agent adds a matcher nodeLabel=<its node>, or replaces $node where the query names it."
        ),
    )
    kind: PrometheusKind = Field(
        default=PrometheusKind.GAUGE,
        description="counter: billed value is the increase; gauge: billed value is the time integral.",
    )
    pod_label: str = Field(default="pod", max_length=63, description="Series label holding the pod name.")
    namespace_label: str = Field(
        default="namespace", max_length=63, description="Series label holding the pod's namespace."
    )
    node_label: str = Field(
        default="node",
        max_length=63,
        description="Series label holding the node name, used to scope queries.",
    )
    scrape_interval_seconds: int = Field(
        default=60,
        ge=1,
        le=3600,
        description=(
            "How often Prometheus scrapes these series. A step longer than 2.5 scrape intervals is a "
            "scrape gap: flagged, never filled."
        ),
    )
    value_scale: float = Field(
        default=1.0,
        gt=0,
        description=(
            "Factor applied to each window's value, read as the decimal it is written as (exact), e.g. "
            "0.001 turns DCGM's millijoules into joules."
        ),
    )
    timeout_seconds: int = Field(
        default=10, ge=1, le=300, description="How long one query may take before it is retried."
    )
    headers: dict[str, Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=dict,
        json_schema_extra={"maxProperties": 32},
        description="Extra HTTP headers on each query, e.g. X-Scope-OrgID for Mimir; no credentials here.",
    )
    bearer_token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding a bearer token sent as Authorization: Bearer."
    )
    basic_auth_secret_ref: SecretRef | None = Field(
        default=None, description="Secret with keys username and password for HTTP basic auth."
    )
    tls: PrometheusTls = Field(
        default_factory=PrometheusTls, description="Certificate checks for an https url."
    )

    @model_validator(mode="after")
    def _credentials_by_reference(self) -> Self:
        if self.bearer_token_secret_ref is not None and self.basic_auth_secret_ref is not None:
            raise ValueError(
                "spec.source.prometheus: set bearerTokenSecretRef or basicAuthSecretRef, not both"
            )
        if any(name.lower() in _PROMETHEUS_CREDENTIAL_HEADERS for name in self.headers):
            raise ValueError(
                "spec.source.prometheus.headers must not carry credentials (Authorization); name a Secret "
                "in bearerTokenSecretRef or basicAuthSecretRef instead"
            )
        return self

    def credentials_secret_name(self) -> str | None:
        """The Secret the agent needs mounted, if any."""
        reference = self.bearer_token_secret_ref or self.basic_auth_secret_ref
        return None if reference is None else reference.name


class RunaiSource(SpecModel):
    """A Run:ai metric per pod on the agent's node, read from the Run:ai REST API for each closed
    window; the events carry the pod's Run:ai project, department and workload."""

    url: HttpUrl = Field(description="Base URL of the Run:ai control plane, e.g. https://org.run.ai.")
    metric: str = Field(
        min_length=1,
        max_length=128,
        pattern=r"^[A-Z][A-Z0-9_]*$",
        description=(
            "Run:ai pod metricType, e.g. GPU_ALLOCATION or GPU_UTILIZATION; the billed value is its "
            "time integral (GPU_ALLOCATION 0.5 for 60 s is 30 GPU-seconds)."
        ),
    )
    credentials_secret_ref: SecretRef = Field(
        description=(
            "Secret with keys clientId and clientSecret of a Run:ai application or service account "
            "(appId and appSecret are accepted too)."
        )
    )
    sample_step_seconds: int = Field(
        default=15,
        ge=1,
        le=3600,
        description=(
            "Spacing of the samples asked for; a spacing wider than 2.5 steps inside a window is a gap, "
            "flagged. Run:ai returns at most 1000 samples per request, so windowSeconds / this must "
            "stay below 1000."
        ),
    )
    lag_seconds: int = Field(
        default=30,
        ge=0,
        le=3600,
        description="How long after a window ends its metrics are asked for (Run:ai's pipeline delay).",
    )


class MeterSource(SpecModel):
    """Where a Meter's numbers come from. Set exactly one field."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "[has(self.allocation), has(self.kubeletUsage), has(self.nvml), has(self.prometheus), "
                "has(self.runai)].filter(x, x).size() == 1",
                "spec.source: set exactly one of allocation, kubeletUsage, nvml, prometheus or runai",
            )
        )
    )

    allocation: AllocationSource | None = Field(
        default=None, description="Allocation of a resource by requests or limits (cpu, memory, GPUs, MIG)."
    )
    kubelet_usage: KubeletUsageSource | None = Field(
        default=None, description="Measured CPU or memory usage from the kubelet."
    )
    nvml: NvmlSource | None = Field(default=None, description="GPU readings from NVML on the node.")
    prometheus: PrometheusSource | None = Field(default=None, description="A Prometheus query.")
    runai: RunaiSource | None = Field(default=None, description="A Run:ai API metric.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        chosen = self.chosen_names()
        if len(chosen) != 1:
            raise ValueError(
                "spec.source: set exactly one of allocation, kubeletUsage, nvml, prometheus or runai"
                + (f" (found {', '.join(chosen)})" if chosen else "")
            )
        return self

    def chosen_names(self) -> list[str]:
        """The wire names of the source fields that are set."""
        names = ("allocation", "kubelet_usage", "nvml", "prometheus", "runai")
        return [to_camel(name) for name in names if getattr(self, name) is not None]

    def summary(self) -> str:
        """A short human form for ``kubectl get``: ``allocation/nvidia.com/gpu``, ``nvml/energy``."""
        if self.allocation is not None:
            return f"allocation/{self.allocation.resource}"
        if self.kubelet_usage is not None:
            return f"kubeletUsage/{self.kubelet_usage.metric}"
        if self.nvml is not None:
            return f"nvml/{self.nvml.metric}"
        if self.prometheus is not None:
            return f"prometheus/{self.prometheus.kind.value}"
        assert self.runai is not None
        return f"runai/{self.runai.metric}"


class PodSelection(SpecModel):
    """Which pods a Meter measures. All given criteria must match; nothing given means every pod."""

    namespaces: list[ObjectName] = Field(
        default_factory=list, max_length=256, description="Only pods in these namespaces; empty means all."
    )
    namespace_selector: LabelSelector | None = Field(
        default=None, description="Only pods in namespaces whose labels match."
    )
    selector: LabelSelector | None = Field(default=None, description="Only pods whose labels match.")


class SubjectSpec(SpecModel):
    """Who is billed: the CloudEvent subject."""

    expression: CelExpression = Field(
        default="namespace.metadata.name",
        description=(
            "CEL string expression over pod, namespace and node, e.g. "
            "namespace.metadata.labels['billing/customer'] or pod.metadata.annotations['team']."
        ),
    )
    fallback: str | None = Field(
        default=None,
        max_length=256,
        description=(
            "Subject used when the expression fails or yields an empty string (a missing label). "
            "Without it such events are flagged incomplete and use subject 'unknown'."
        ),
    )


class MeterSpec(SpecModel):
    """What to measure and how to turn it into usage events."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "86400 % self.windowSeconds == 0",
                "spec.windowSeconds must divide a day (86400) evenly so windows align to the clock; "
                "use for example 60, 300, 900 or 3600",
            ),
            (
                "!has(self.source.runai) || self.windowSeconds / self.source.runai.sampleStepSeconds < 1000",
                "spec.source.runai.sampleStepSeconds: Run:ai returns at most 1000 samples per request; "
                "raise sampleStepSeconds to at least windowSeconds / 999",
            ),
        )
    )

    event_type: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$",
        description="The CloudEvent type the billing API meters on, e.g. gpu-seconds.",
    )
    unit: str = Field(
        min_length=1, max_length=63, description="Unit of the event value, e.g. gpu-seconds or byte-seconds."
    )
    window_seconds: int = Field(
        default=60,
        ge=10,
        le=SECONDS_PER_DAY,
        description="Length of each clock-aligned window; one event per pod (and device) per window.",
    )
    source: MeterSource = Field(description="Where the numbers come from; set exactly one source.")
    pods: PodSelection = Field(
        default_factory=PodSelection, description="Which pods are measured; by default every pod."
    )
    subject: SubjectSpec = Field(
        default_factory=SubjectSpec, description="Who is billed; by default the pod's namespace name."
    )
    dimensions: dict[DataKey, CelExpression] = Field(
        default_factory=dict,
        json_schema_extra={"maxProperties": 32},
        description="Extra event data: key -> CEL expression over pod, namespace and node.",
    )

    @model_validator(mode="after")
    def _window_divides_day(self) -> Self:
        if SECONDS_PER_DAY % self.window_seconds:
            raise ValueError(
                f"spec.windowSeconds={self.window_seconds} must divide a day (86400) evenly so windows "
                "align to the clock; use for example 60, 300, 900 or 3600"
            )
        runai = self.source.runai
        if runai is not None and self.window_seconds // runai.sample_step_seconds >= 1000:
            raise ValueError(
                "spec.source.runai.sampleStepSeconds: Run:ai returns at most 1000 samples per request; "
                "raise sampleStepSeconds to at least windowSeconds / 999"
            )
        return self


# ---------------------------------------------------------------------------------------------------
# Pipeline

_PROTECTED_LIST = "[" + ", ".join(f"'{key}'" for key in PROTECTED_DATA_KEYS) + "]"


class ProcessorSpec(SpecModel):
    """One step applied to events before they reach the output. Set exactly one field.

    Keys name entries of the event's ``data``. Processors see ``event`` (the CloudEvent as a map)."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "[has(self.filter), has(self.set), has(self.drop), has(self.rename)]"
                ".filter(x, x).size() == 1",
                "spec.processors[]: set exactly one of filter, set, drop or rename in each processor",
            ),
            (
                f"!has(self.drop) || self.drop.all(k, !(k in {_PROTECTED_LIST}))",
                f"spec.processors[].drop: the keys {', '.join(PROTECTED_DATA_KEYS)} are required in every "
                "event and cannot be dropped",
            ),
            (
                f"!has(self.rename) || self.rename.all(k, !(k in {_PROTECTED_LIST}) && "
                f"!(self.rename[k] in {_PROTECTED_LIST}))",
                f"spec.processors[].rename: the keys {', '.join(PROTECTED_DATA_KEYS)} are required in every "
                "event and cannot be renamed or overwritten",
            ),
            (
                f"!has(self.set) || self.set.all(k, !(k in {_PROTECTED_LIST}))",
                f"spec.processors[].set: the keys {', '.join(PROTECTED_DATA_KEYS)} are computed by the "
                "meter and cannot be set",
            ),
        )
    )

    filter: CelExpression | None = Field(
        default=None, description="CEL bool over event; events for which it is false are not billed."
    )
    set: dict[DataKey, CelExpression] | None = Field(
        default=None,
        json_schema_extra={"maxProperties": 32},
        description="Data keys to set: key -> CEL expression over event.",
    )
    drop: list[DataKey] | None = Field(
        default=None, max_length=32, description="Data keys to remove from each event."
    )
    rename: dict[DataKey, DataKey] | None = Field(
        default=None,
        json_schema_extra={"maxProperties": 32},
        description="Data keys to rename: old key -> new key.",
    )

    @model_validator(mode="after")
    def _exactly_one_and_protected(self) -> Self:
        chosen = [name for name in ("filter", "set", "drop", "rename") if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError(
                "spec.processors[]: set exactly one of filter, set, drop or rename in each processor"
                + (f" (found {', '.join(chosen)})" if chosen else "")
            )
        touched = set(self.drop or ()) | set(self.set or {}) | set(self.rename or {})
        touched |= set((self.rename or {}).values())
        protected = sorted(touched.intersection(PROTECTED_DATA_KEYS))
        if protected:
            raise ValueError(
                f"spec.processors[]: {', '.join(protected)} are required in every event and cannot be "
                "set, dropped or renamed"
            )
        return self


class PipelineSpec(SpecModel):
    """Binds Meters to a Collector and lists the processors their events pass through."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "has(self.meters) != has(self.meterSelector)",
                "spec: set exactly one of meters (a list of Meter names) or meterSelector (a label selector)",
            )
        )
    )

    collector_ref: ObjectName = Field(
        description="Name of the Collector, in this namespace, that ships the events."
    )
    meters: list[ObjectName] | None = Field(
        default=None,
        min_length=1,
        max_length=500,
        description="Names of Meters in this namespace to bind. Use this or meterSelector.",
    )
    meter_selector: LabelSelector | None = Field(
        default=None, description="Bind every Meter in this namespace whose labels match. Use this or meters."
    )
    processors: list[ProcessorSpec] = Field(
        default_factory=list, max_length=50, description="Steps applied in order to every event."
    )

    @model_validator(mode="after")
    def _meters_or_selector(self) -> Self:
        if (self.meters is None) == (self.meter_selector is None):
            raise ValueError(
                "spec: set exactly one of meters (a list of Meter names) or meterSelector (a label selector)"
            )
        return self


# ---------------------------------------------------------------------------------------------------
# Collector


class OutputType(StrEnum):
    OPENMETER = "openmeter"
    FLEXPRICE = "flexprice"
    LAGO = "lago"
    CLOUDEVENTS = "cloudevents"


class BatchSpec(SpecModel):
    max_events: int = Field(default=500, ge=1, le=10_000, description="Most events in one request.")
    max_delay_seconds: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="Longest an event waits for its batch to fill before it is sent.",
    )


class RetrySpec(SpecModel):
    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "self.initialBackoffSeconds <= self.maxBackoffSeconds",
                "output.retry: initialBackoffSeconds must not exceed maxBackoffSeconds; raise "
                "maxBackoffSeconds or lower initialBackoffSeconds",
            )
        )
    )

    initial_backoff_seconds: float = Field(
        default=1.0, ge=0.01, le=3600, description="First wait after a retryable failure; doubles each time."
    )
    max_backoff_seconds: float = Field(
        default=300.0, ge=0.01, le=86_400, description="Cap on the wait between retries. Retries never stop."
    )

    @model_validator(mode="after")
    def _initial_below_max(self) -> Self:
        if self.initial_backoff_seconds > self.max_backoff_seconds:
            raise ValueError(
                "output.retry: initialBackoffSeconds must not exceed maxBackoffSeconds; raise "
                "maxBackoffSeconds or lower initialBackoffSeconds"
            )
        return self


class RateLimitSpec(SpecModel):
    requests_per_second: float = Field(
        default=10.0, gt=0, le=10_000, description="Most requests per second to the billing API."
    )


_CREDENTIAL_HEADERS = ("authorization", "x-api-key", "proxy-authorization")


class CloudEventsMode(StrEnum):
    BATCH = "batch"
    STRUCTURED = "structured"


class CloudEventsOutputSpec(SpecModel):
    """Options of output type cloudevents (any CloudEvents HTTP endpoint; output.url is the endpoint)."""

    mode: CloudEventsMode = Field(
        default=CloudEventsMode.BATCH,
        description=(
            "batch: one request per batch, a JSON array as application/cloudevents-batch+json; "
            "structured: one request per event, application/cloudevents+json (HTTP binding, structured "
            "mode), for endpoints that take no batches."
        ),
    )


_SUBSCRIPTION_ID = Annotated[str, Field(min_length=1, max_length=255)]


class LagoOutputSpec(SpecModel):
    """Options of output type lago: which subscription an event bills (its external_subscription_id).

    Lago bills subscriptions, not customers. Looked up in this order: subscriptionIdBySubject, then
    subscriptionIdDimension or subscriptionIdExpression; with neither set, the event subject itself.
    An event none of them gives an id is dead-lettered with the reason, never sent to a guessed one.
    """

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "!(has(self.subscriptionIdDimension) && has(self.subscriptionIdExpression))",
                "output.lago: set subscriptionIdDimension or subscriptionIdExpression, not both",
            )
        )
    )

    subscription_id_by_subject: dict[str, _SUBSCRIPTION_ID] = Field(
        default_factory=dict,
        json_schema_extra={"maxProperties": 10_000},
        description="external_subscription_id per event subject (the customer), e.g. team-vision: sub_42.",
    )
    subscription_id_dimension: DataKey | None = Field(
        default=None,
        description=(
            "Event data key holding the external_subscription_id, e.g. a Meter dimension read from a "
            "namespace label."
        ),
    )
    subscription_id_expression: CelExpression | None = Field(
        default=None,
        description=(
            "CEL over event (the CloudEvent as processors see it) giving the external_subscription_id, "
            "e.g. event.subject + '-' + event.data.gpu_model."
        ),
    )

    @model_validator(mode="after")
    def _one_way(self) -> Self:
        if self.subscription_id_dimension is not None and self.subscription_id_expression is not None:
            raise ValueError("output.lago: set subscriptionIdDimension or subscriptionIdExpression, not both")
        return self


class OutputSpec(SpecModel):
    """Where events are delivered."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "!(self.type in ['lago', 'flexprice']) || has(self.credentialsSecretRef)",
                "output.credentialsSecretRef is required for type lago and flexprice: name a Secret and "
                "the key holding the API key",
            ),
            (
                "!has(self.headers) || self.headers.all(h, !(h.lowerAscii() in "
                "['authorization', 'x-api-key', 'proxy-authorization']))",
                "output.headers must not carry credentials (Authorization, X-Api-Key); put the secret in a "
                "Secret and name it in output.credentialsSecretRef",
            ),
            (
                "!has(self.cloudevents) || self.type == 'cloudevents'",
                "output.cloudevents applies to type cloudevents only; remove it or change output.type",
            ),
            (
                "!has(self.lago) || self.type == 'lago'",
                "output.lago applies to type lago only; remove it or change output.type",
            ),
        )
    )

    type: OutputType = Field(description="The billing API: openmeter, flexprice, lago or cloudevents.")
    url: HttpUrl = Field(description="Base URL of the billing API, e.g. https://openmeter.cloud.")
    credentials_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding the API key or token. Credentials are never inline."
    )
    headers: dict[str, Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=dict,
        json_schema_extra={"maxProperties": 32},
        description="Extra HTTP headers sent with each request (any type); no credentials here.",
    )
    batch: BatchSpec = Field(default_factory=BatchSpec, description="How events are grouped into requests.")
    retry: RetrySpec = Field(default_factory=RetrySpec, description="Backoff between retries.")
    rate_limit: RateLimitSpec = Field(default_factory=RateLimitSpec, description="Request rate cap.")
    timeout_seconds: float = Field(default=30.0, gt=0, le=600, description="Timeout of one HTTP request.")
    cloudevents: CloudEventsOutputSpec | None = Field(
        default=None, description="Options of type cloudevents: structured or batch mode."
    )
    lago: LagoOutputSpec | None = Field(
        default=None, description="Options of type lago: which subscription each event bills."
    )

    @model_validator(mode="after")
    def _options_match_the_type(self) -> Self:
        for name, applies_to in (("cloudevents", OutputType.CLOUDEVENTS), ("lago", OutputType.LAGO)):
            if getattr(self, name) is not None and self.type is not applies_to:
                raise ValueError(
                    f"output.{name} applies to type {applies_to.value} only; remove it or change output.type"
                )
        return self

    @model_validator(mode="after")
    def _credentials_by_reference(self) -> Self:
        if self.type in (OutputType.LAGO, OutputType.FLEXPRICE) and self.credentials_secret_ref is None:
            raise ValueError(
                "output.credentialsSecretRef is required for type lago and flexprice: name a Secret and "
                "the key holding the API key"
            )
        if any(name.lower() in _CREDENTIAL_HEADERS for name in self.headers):
            raise ValueError(
                "output.headers must not carry credentials (Authorization, X-Api-Key); put the secret in a "
                "Secret and name it in output.credentialsSecretRef"
            )
        return self


class BufferFullPolicy(StrEnum):
    BLOCK = "Block"
    DROP_OLDEST = "DropOldest"


class BufferDeletePolicy(StrEnum):
    RETAIN = "Retain"
    DRAIN = "Drain"


# Smaller, one agent batch (1000 events, ~0.7 MB) could not fit beside the queue's headroom and the
# gateway would answer 503 to it forever.
MIN_BUFFER_SIZE = "4Mi"


class BufferSpec(SpecModel):
    """The gateway's durable buffer on a PersistentVolume."""

    # A StatefulSet's volumeClaimTemplates are immutable, so the volume shape is fixed at creation.
    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "self.size == oldSelf.size && has(self.storageClassName) == has(oldSelf.storageClassName) && "
                "(!has(self.storageClassName) || self.storageClassName == oldSelf.storageClassName)",
                "buffer.size and buffer.storageClassName cannot change once the volumes exist; create a new "
                "Collector (with onDelete: Drain on the old one) to move to a new size or class",
            ),
            (
                f"quantity(string(self.size)).compareTo(quantity('{MIN_BUFFER_SIZE}')) >= 0",
                f"buffer.size must be at least {MIN_BUFFER_SIZE}: one agent batch (about 1 MB) must fit "
                "in the buffer with room to spare; write for example 10Gi",
            ),
        )
    )

    size: Quantity = Field(
        default="10Gi",
        description=f"Capacity of each gateway replica's volume, e.g. 10Gi; at least {MIN_BUFFER_SIZE}.",
    )
    storage_class_name: str | None = Field(
        default=None, max_length=253, description="StorageClass of the volume; the cluster default if unset."
    )
    retention_hours: int = Field(
        default=168,
        ge=1,
        le=24 * 366,
        description=(
            "Age cap of the buffer: the longest an undelivered event may wait on the volume, counted from "
            "when the gateway accepted it. Past it the buffer counts as full and whenFull applies: Block "
            "answers ingest 503 (agents spool and push back) until delivery catches up; DropOldest drops "
            "the events older than this, counted. Delivered events are deleted at once; dead-lettered "
            "events stay until kubemeter dlq purge."
        ),
    )
    when_full: BufferFullPolicy = Field(
        default=BufferFullPolicy.BLOCK,
        description=(
            "When the buffer is full (its bytes at the cap, or its oldest event past retentionHours): "
            "Block pushes back on agents (nothing lost); DropOldest discards the oldest events, counted."
        ),
    )
    on_delete: BufferDeletePolicy = Field(
        default=BufferDeletePolicy.RETAIN,
        description=(
            "When the Collector is deleted: Retain keeps the volumes for a later Collector of the same "
            "name; Drain delivers every buffered event first, then deletes the volumes."
        ),
    )

    @model_validator(mode="after")
    def _size_holds_a_batch(self) -> BufferSpec:
        # The same rule as the CRD's, for configs that never pass through the API server.
        if quantity_to_bytes(self.size) < quantity_to_bytes(MIN_BUFFER_SIZE):
            raise ValueError(
                f"buffer.size must be at least {MIN_BUFFER_SIZE}: one agent batch (about 1 MB) must fit "
                "in the buffer with room to spare; write for example 10Gi"
            )
        return self


class ResourceRequirements(SpecModel):
    requests: dict[str, Quantity] = Field(
        default_factory=dict,
        json_schema_extra={"maxProperties": 16},
        description="Minimum resources, e.g. cpu: 50m, memory: 64Mi.",
    )
    limits: dict[str, Quantity] = Field(
        default_factory=dict, json_schema_extra={"maxProperties": 16}, description="Maximum resources."
    )


def _default_agent_resources() -> ResourceRequirements:
    return ResourceRequirements(requests={"cpu": "50m", "memory": "64Mi"}, limits={"memory": "256Mi"})


def _default_gateway_resources() -> ResourceRequirements:
    return ResourceRequirements(requests={"cpu": "100m", "memory": "128Mi"}, limits={"memory": "512Mi"})


class AgentSpec(SpecModel):
    interval_seconds: int = Field(
        default=15, ge=1, le=3600, description="How often the agent reads its sources and closes windows."
    )
    resources: ResourceRequirements = Field(
        default_factory=_default_agent_resources, description="Resources of each agent container."
    )
    priority_class_name: str | None = Field(
        default=None,
        max_length=253,
        description="PriorityClass of agent pods, so they are not evicted first.",
    )


_INGEST_TOKEN_OWN_SECRET = (
    "gateway.ingestTokenSecretRef must name a Secret of its own, not the one in "
    "output.credentialsSecretRef: agents on every node mount the ingest token's Secret and must not "
    "see the billing API key"
)


class GatewaySpec(SpecModel):
    replicas: int = Field(
        default=1,
        ge=1,
        le=16,
        description="Gateway pods, each with its own volume; 2 or more for availability.",
    )
    resources: ResourceRequirements = Field(
        default_factory=_default_gateway_resources, description="Resources of each gateway container."
    )
    ingest_token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description=(
            "Secret key holding the bearer token agents and applications send to the gateway's ingest "
            "(Authorization: Bearer). The gateway accepts every line of it, agents send the first, and "
            "both re-read it when the kubelet updates the Secret: rotate with no restart by writing "
            "'new<newline>old', then 'new'. Use a Secret of its own: agents on every node mount it. "
            "Unset, ingest accepts unauthenticated requests."
        ),
    )


class TolerationOperator(StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Toleration(SpecModel):
    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "self.operator != 'Exists' || !has(self.value) || self.value == ''",
                "tolerations[]: operator Exists takes no value; remove value or use operator Equal",
            )
        )
    )

    key: str | None = Field(
        default=None, max_length=316, description="Taint key; empty with Exists matches all."
    )
    operator: TolerationOperator = Field(
        default=TolerationOperator.EQUAL, description="Equal compares value; Exists matches any value."
    )
    value: str | None = Field(default=None, max_length=63, description="Taint value for operator Equal.")
    effect: TaintEffect | None = Field(default=None, description="Taint effect to tolerate; empty means all.")
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="For NoExecute: how long the pod stays after the taint appears."
    )


class CollectorSpec(SpecModel):
    """Where agents run and where their events go."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "!has(self.gateway) || !has(self.gateway.ingestTokenSecretRef) || "
                "!has(self.output.credentialsSecretRef) || "
                "self.gateway.ingestTokenSecretRef.name != self.output.credentialsSecretRef.name",
                _INGEST_TOKEN_OWN_SECRET,
            )
        )
    )

    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict,
        json_schema_extra={"maxProperties": 32},
        description="Agents run only on nodes with these labels; empty means every node.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Taints agents tolerate, e.g. nvidia.com/gpu."
    )
    agent: AgentSpec = Field(default_factory=AgentSpec, description="The per-node agent DaemonSet.")
    output: OutputSpec = Field(description="The billing API events are delivered to.")
    buffer: BufferSpec = Field(default_factory=BufferSpec, description="The gateway's durable buffer.")
    gateway: GatewaySpec = Field(default_factory=GatewaySpec, description="The gateway StatefulSet.")

    @model_validator(mode="after")
    def _ingest_token_in_its_own_secret(self) -> Self:
        token, credentials = self.gateway.ingest_token_secret_ref, self.output.credentials_secret_ref
        if token is not None and credentials is not None and token.name == credentials.name:
            raise ValueError(_INGEST_TOKEN_OWN_SECRET)
        return self


# ---------------------------------------------------------------------------------------------------
# Rendered files (ConfigMap content) and the gateway's status report


class ResolvedMeter(SpecModel):
    """A Meter as the agent runs it: its spec plus the processors of the Pipeline that binds it."""

    name: str = Field(description="The Meter's name.")
    namespace: str = Field(description="The Meter's namespace.")
    uid: str = Field(description="The Meter's uid; part of every event id, so a recreated Meter is new.")
    pipeline: str = Field(description="Name of the Pipeline that binds this Meter to the Collector.")
    spec: MeterSpec = Field(description="The Meter's spec.")
    processors: list[ProcessorSpec] = Field(default_factory=list, description="The Pipeline's processors.")
    credentials_dir: str | None = Field(
        default=None, description="Directory holding the keys of the source's credentials Secret, if any."
    )


class AgentConfig(SpecModel):
    """``agent.yaml``: read by ``kubemeter agent``, reloaded when the file changes (no restart)."""

    cluster: str = Field(description="Cluster name; CloudEvent source is kubemeter/<cluster>.")
    collector: str = Field(description="Name of the Collector this agent belongs to.")
    namespace: str = Field(description="Namespace of the Collector.")
    meters: list[ResolvedMeter] = Field(default_factory=list, description="Meters to run, sorted by name.")
    gateway_url: str = Field(
        description="Where the agent forwards events, e.g. http://c-gateway.ns.svc:8480."
    )
    interval_seconds: int = Field(default=15, ge=1, description="How often sources are read.")
    spool_dir: str = Field(description="hostPath directory for the node-local spool.")
    checkpoint_dir: str = Field(description="hostPath directory for per (meter, pod) checkpoints.")
    spool_max_bytes: int = Field(default=256 * 2**20, ge=1, description="Spool cap before pushing back.")
    metrics_port: int = Field(default=AGENT_METRICS_PORT, description="Port for /healthz and /metrics.")
    pod_resources_socket: str = Field(
        default="/var/lib/kubelet/pod-resources/kubelet.sock", description="Kubelet PodResources socket."
    )
    host_proc_dir: str = Field(
        default=HOST_PROC_DIR, description="The host's /proc, to map the host PIDs NVML reports to pods."
    )
    kubelet_url: str | None = Field(
        default=None,
        description="Kubelet base URL; unset means the InternalIP and kubelet port in the Node's status "
        "(the kubelet authorises /stats as nodes/stats; the API server's node proxy is not used).",
    )
    ingest_token_file: str | None = Field(
        default=None,
        description=(
            "File holding the gateway's ingest token (gateway.ingestTokenSecretRef, mounted); its first "
            "line is sent as Authorization: Bearer, re-read when the file changes."
        ),
    )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_wire(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> AgentConfig:
        return cls.model_validate(yaml.safe_load(text))


class GatewayConfig(SpecModel):
    """``gateway.yaml``: read by ``kubemeter gateway``."""

    cluster: str = Field(description="Cluster name; CloudEvent source is kubemeter/<cluster>.")
    collector: str = Field(description="Name of the Collector this gateway belongs to.")
    namespace: str = Field(description="Namespace of the Collector.")
    output: OutputSpec = Field(description="Where events are delivered.")
    credentials_file: str | None = Field(
        default=None, description="File holding the credential named by output.credentialsSecretRef."
    )
    buffer: BufferSpec = Field(default_factory=BufferSpec, description="Buffer policy.")
    buffer_max_bytes: int = Field(ge=1, description="buffer.size in bytes: the cap of the on-disk queue.")
    data_dir: str = Field(description="Directory on the PersistentVolume for the queue.")
    ingest_token_file: str | None = Field(
        default=None,
        description=(
            "File holding the accepted ingest tokens, one per line (gateway.ingestTokenSecretRef, "
            "mounted), re-read when it changes; unset means ingest is not authenticated."
        ),
    )
    listen_address: str = Field(
        default=f"0.0.0.0:{GATEWAY_PORT}", description="host:port for ingest, /healthz, /metrics, /status."
    )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_wire(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> GatewayConfig:
        return cls.model_validate(yaml.safe_load(text))


class GatewayStatusReport(SpecModel):
    """The JSON body of ``GET /status`` on a gateway replica; the operator copies it into the Collector's
    status (summed over replicas)."""

    buffered_events: int = Field(default=0, ge=0, description="Events on disk not yet delivered.")
    buffered_bytes: int = Field(default=0, ge=0, description="Bytes of those events.")
    oldest_event_age_seconds: float = Field(default=0, ge=0, description="Age of the oldest buffered event.")
    delivered_events: int = Field(default=0, ge=0, description="Events the billing API accepted, ever.")
    dead_lettered_events: int = Field(default=0, ge=0, description="Events the billing API refused, ever.")
    last_delivery_error: str | None = Field(default=None, description="The latest delivery failure, if any.")
    paused_reason: str | None = Field(
        default=None, description="Set while delivery is paused, e.g. credentials refused (401/403)."
    )


class AgentStatusReport(SpecModel):
    """The JSON body of ``GET /healthz`` on an agent; the operator gathers ``sourceFaults`` from every
    agent into the Collector's status."""

    node: str = Field(description="The node the agent runs on.")
    problems: list[str] = Field(
        default_factory=list, description="Why the agent is unhealthy (its pod watch is down, ...)."
    )
    source_faults: dict[str, str] = Field(
        default_factory=dict,
        description="Meter (namespace/name) -> why its source is behind; its windows are flagged meanwhile.",
    )
    meters: dict[str, str] = Field(
        default_factory=dict, description="Meter (namespace/name) -> ok, or why closing its windows failed."
    )
