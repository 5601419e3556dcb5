"""The Meter: what to measure, for which pods, billed to whom."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal, Self

from pydantic import ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from kubemeter.api.common import (
    SECONDS_PER_DAY,
    CelExpression,
    DataKey,
    HttpUrl,
    LabelSelector,
    ObjectName,
    SecretKeyRef,
    SecretRef,
    SpecModel,
    cel_rules,
)

# ---------------------------------------------------------------------------------------------------
# Meter


class AllocationBasis(StrEnum):
    REQUESTS = "requests"
    LIMITS = "limits"
    MAX_REQUEST_USAGE = "maxRequestUsage"


RESOURCE_NAME_PATTERN = r"^([a-z0-9.-]+/)?[A-Za-z0-9][-A-Za-z0-9_.]*$"
DRIVER_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A DeviceClass selector is a short predicate; the agent evaluates it once per device and window.
DeviceSelector = Annotated[str, Field(min_length=1, max_length=1024)]


class AllocationSourceSpec(SpecModel):
    """Allocation integrated exactly from pod lifecycle timestamps: what a pod holds, not what it uses."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "self.basis != 'maxRequestUsage' || self.resource in ['cpu', 'memory']",
                "spec.source.allocation.basis: maxRequestUsage compares with kubelet usage, which exists "
                "for cpu and memory only; use basis requests or limits for other resources",
            )
        )
    )

    resource: str = Field(
        min_length=1,
        max_length=253,
        pattern=RESOURCE_NAME_PATTERN,
        description=(
            "The resource name as it appears in a container's resources: cpu, memory, "
            "nvidia.com/gpu, a MIG profile such as nvidia.com/mig-1g.5gb, or any extended resource."
        ),
    )
    basis: AllocationBasis = Field(
        default=AllocationBasis.REQUESTS,
        description=(
            "Bill what containers request (requests), what they are capped at (limits), or per window "
            "the larger of the request and the kubelet-measured usage (maxRequestUsage; cpu and memory "
            "only: core-seconds against the CPU counter's increase, byte-seconds against the working "
            "set integrated over the window)."
        ),
    )

    @model_validator(mode="after")
    def _usage_basis_has_usage(self) -> Self:
        if self.basis == AllocationBasis.MAX_REQUEST_USAGE and self.resource not in ("cpu", "memory"):
            raise ValueError(
                "spec.source.allocation.basis: maxRequestUsage compares with kubelet usage, which exists "
                "for cpu and memory only; use basis requests or limits for other resources"
            )
        return self


class DraSourceSpec(SpecModel):
    """Devices allocated through Dynamic Resource Allocation: the ResourceClaims (named or from a
    ResourceClaimTemplate) reserved for each pod, billed over the pod's lifecycle exactly as
    allocation is. A claim shared by several pods is split equally among the pods holding it at
    each instant."""

    driver: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=DRIVER_NAME_PATTERN,
        description="Only devices of this DRA driver, e.g. gpu.nvidia.com. Unset: every driver.",
    )
    selector: DeviceSelector | None = Field(
        default=None,
        description=(
            "CEL over the device, as in a DeviceClass selector: device.driver, "
            "device.attributes['gpu.nvidia.com'].productName, device.capacity['gpu.nvidia.com'].memory; "
            "e.g. device.attributes['gpu.nvidia.com'].type == 'mig'. Attributes come from this node's "
            "ResourceSlices. Unset: every allocated device."
        ),
    )
    per_device: bool = Field(
        default=True,
        description=(
            "One event per pod, device and window (data carries driver, pool, device, model, "
            "mig_profile), or false: one event per pod and window with the devices summed."
        ),
    )


class IdleDevicesSpec(SpecModel):
    """Which DRA devices of the node an idle meter counts."""

    driver: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=DRIVER_NAME_PATTERN,
        description="Only devices of this DRA driver, e.g. gpu.nvidia.com. Unset: every driver.",
    )
    selector: DeviceSelector | None = Field(
        default=None, description="CEL over the device, as in spec.source.dra.selector."
    )


class IdleSourceSpec(SpecModel):
    """A node's idle capacity: allocatable minus what its pods hold (their requests, or the DRA
    devices allocated to them), per window and node state, billed to one subject. For every node and
    window: the pods' allocation + idle = allocatable x the time the node was there."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "has(self.resource) != has(self.devices)",
                "spec.source.idle: set exactly one of resource (cpu, memory, nvidia.com/gpu, ...) or "
                "devices (DRA devices)",
            )
        )
    )

    resource: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        pattern=RESOURCE_NAME_PATTERN,
        description=(
            "A resource of the node's status.allocatable: cpu, memory, nvidia.com/gpu, a MIG profile or "
            "any extended resource; pods hold their effective requests of it."
        ),
    )
    devices: IdleDevicesSpec | None = Field(
        default=None,
        description="DRA devices of the node's ResourceSlices, grouped by driver, model and MIG profile.",
    )
    subject: str = Field(
        default="platform-idle",
        min_length=1,
        max_length=256,
        description="The subject billed for idle capacity (the event's subject; no pod is involved).",
    )
    model_label: str = Field(
        default="nvidia.com/gpu.product",
        max_length=316,
        description="Node label whose value is the event's gpu_model for an nvidia.com/ resource.",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Self:
        if (self.resource is None) == (self.devices is None):
            raise ValueError(
                "spec.source.idle: set exactly one of resource (cpu, memory, nvidia.com/gpu, ...) or "
                "devices (DRA devices)"
            )
        return self


class KubeletUsageSourceSpec(SpecModel):
    """Usage from the kubelet's cumulative counters (stats/summary), per pod."""

    metric: Literal["cpu", "memory"] = Field(
        description="cpu: core-seconds from usageCoreNanoSeconds; memory: working-set byte-seconds."
    )


class NvmlSourceSpec(SpecModel):
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


class PrometheusTlsSpec(SpecModel):
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


class PrometheusSourceSpec(SpecModel):
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
    tls: PrometheusTlsSpec = Field(
        default_factory=PrometheusTlsSpec, description="Certificate checks for an https url."
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


class RunaiSourceSpec(SpecModel):
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
                "[has(self.allocation), has(self.dra), has(self.idle), has(self.kubeletUsage), "
                "has(self.nvml), has(self.prometheus), has(self.runai)].filter(x, x).size() == 1",
                "spec.source: set exactly one of allocation, dra, idle, kubeletUsage, nvml, prometheus "
                "or runai",
            )
        )
    )

    allocation: AllocationSourceSpec | None = Field(
        default=None, description="Allocation of a resource by requests or limits (cpu, memory, GPUs, MIG)."
    )
    dra: DraSourceSpec | None = Field(
        default=None, description="Devices allocated to pods through DRA ResourceClaims (resource.k8s.io/v1)."
    )
    idle: IdleSourceSpec | None = Field(
        default=None, description="The node's idle capacity of a resource or of its DRA devices."
    )
    kubelet_usage: KubeletUsageSourceSpec | None = Field(
        default=None, description="Measured CPU or memory usage from the kubelet."
    )
    nvml: NvmlSourceSpec | None = Field(default=None, description="GPU readings from NVML on the node.")
    prometheus: PrometheusSourceSpec | None = Field(default=None, description="A Prometheus query.")
    runai: RunaiSourceSpec | None = Field(default=None, description="A Run:ai API metric.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        chosen = self.chosen_names()
        if len(chosen) != 1:
            raise ValueError(
                "spec.source: set exactly one of allocation, dra, idle, kubeletUsage, nvml, prometheus "
                "or runai" + (f" (found {', '.join(chosen)})" if chosen else "")
            )
        return self

    def chosen_names(self) -> list[str]:
        """The wire names of the source fields that are set."""
        names = ("allocation", "dra", "idle", "kubelet_usage", "nvml", "prometheus", "runai")
        return [to_camel(name) for name in names if getattr(self, name) is not None]

    def summary(self) -> str:
        """A short human form for ``kubectl get``: ``allocation/nvidia.com/gpu``, ``nvml/energy``."""
        if self.allocation is not None:
            return f"allocation/{self.allocation.resource}"
        if self.dra is not None:
            return f"dra/{self.dra.driver or 'all'}"
        if self.idle is not None:
            return f"idle/{self.idle.resource or 'devices'}"
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
