"""The Collector: where agents run, where events go, and the buffer between."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Self

from pydantic import ConfigDict, Field, model_validator

from kubemeter.api.common import (
    CelExpression,
    DataKey,
    HttpUrl,
    Quantity,
    SecretKeyRef,
    SecretRef,
    SpecModel,
    cel_rules,
    quantity_to_bytes,
)

# ---------------------------------------------------------------------------------------------------
# Collector


class OutputType(StrEnum):
    OPENMETER = "openmeter"
    FLEXPRICE = "flexprice"
    LAGO = "lago"
    CLOUDEVENTS = "cloudevents"
    KAFKA = "kafka"


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


# ---------------------------------------------------------------------------------------------------
# Kafka output

# host:port, the host a DNS name, IPv4 or [IPv6] address.
_BOOTSTRAP_SERVER = Annotated[
    str, Field(min_length=3, max_length=261, pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}$")
]
# Kafka's own rule for topic names (legal characters, at most 249), not "." or "..".
KAFKA_TOPIC_PATTERN = r"^[a-zA-Z0-9._-]{1,249}$"
_TOPIC = Annotated[str, Field(min_length=1, max_length=249, pattern=KAFKA_TOPIC_PATTERN)]


class KafkaMode(StrEnum):
    STRUCTURED = "structured"
    BINARY = "binary"


class KafkaCompression(StrEnum):
    NONE = "none"
    GZIP = "gzip"
    SNAPPY = "snappy"
    LZ4 = "lz4"
    ZSTD = "zstd"


class SaslMechanism(StrEnum):
    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"


class KafkaSaslSpec(SpecModel):
    mechanism: SaslMechanism = Field(
        default=SaslMechanism.SCRAM_SHA_512,
        description="PLAIN (only over TLS outside a test), SCRAM-SHA-256 or SCRAM-SHA-512.",
    )
    secret_ref: SecretRef = Field(
        description=(
            "Secret with keys username and password. Re-read when the kubelet updates it: a fixed "
            "password resumes delivery without a restart."
        )
    )


class KafkaTlsSpec(SpecModel):
    ca_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding the PEM CA bundle the brokers' certificates chain to; unset, the "
        "system CAs.",
    )
    client_certificate_secret_ref: SecretRef | None = Field(
        default=None,
        description="A kubernetes.io/tls Secret (keys tls.crt and tls.key) for mutual TLS, if the brokers "
        "ask for a client certificate.",
    )


class KafkaOutputSpec(SpecModel):
    """Options of output type kafka: one record per event, key = the event id, value = the CloudEvent.

    Produced with an idempotent producer and acks=all; an event counts as delivered only once every
    in-sync replica has it.
    """

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "has(self.topic) != has(self.topicExpression)",
                "output.kafka: set exactly one of topic (a fixed topic) and topicExpression (CEL over "
                "event, e.g. 'usage.' + event.type)",
            ),
        )
    )

    bootstrap_servers: list[_BOOTSTRAP_SERVER] = Field(
        min_length=1,
        max_length=32,
        description="host:port of one or more brokers, e.g. kafka-0.kafka.svc:9093.",
    )
    topic: _TOPIC | None = Field(default=None, description="The topic every event goes to.")
    topic_expression: CelExpression | None = Field(
        default=None,
        description=(
            "CEL over event (the CloudEvent) giving the topic, e.g. 'usage.' + event.type. An event whose "
            "topic is not a legal Kafka topic name is dead-lettered with the reason."
        ),
    )
    mode: KafkaMode = Field(
        default=KafkaMode.STRUCTURED,
        description=(
            "CloudEvents Kafka binding: structured (default; the value is the whole CloudEvent as JSON, "
            "content-type application/cloudevents+json) or binary (the value is the event data, the "
            "attributes are ce_* headers)."
        ),
    )
    compression: KafkaCompression = Field(
        default=KafkaCompression.LZ4, description="Record batch compression: none, gzip, snappy, lz4, zstd."
    )
    max_in_flight: int = Field(
        default=5,
        ge=1,
        le=5,
        description="Produce requests in flight per broker connection (at most 5: the idempotent "
        "producer keeps order and drops retried duplicates only up to 5).",
    )
    tls: KafkaTlsSpec | None = Field(default=None, description="Connect over TLS; unset, plaintext.")
    sasl: KafkaSaslSpec | None = Field(default=None, description="Authenticate with SASL; unset, none.")

    def secret_files(self) -> list[tuple[str, str, SecretKeyRef]]:
        """(role, field path, Secret key) of every credential file the gateway reads for Kafka."""
        files: list[tuple[str, str, SecretKeyRef]] = []
        if self.sasl is not None:
            name = self.sasl.secret_ref.name
            where = "spec.output.kafka.sasl.secretRef"
            files.append(("username", where, SecretKeyRef(name=name, key="username")))
            files.append(("password", where, SecretKeyRef(name=name, key="password")))
        if self.tls is not None and self.tls.ca_secret_ref is not None:
            files.append(("ca", "spec.output.kafka.tls.caSecretRef", self.tls.ca_secret_ref))
        if self.tls is not None and self.tls.client_certificate_secret_ref is not None:
            name = self.tls.client_certificate_secret_ref.name
            where = "spec.output.kafka.tls.clientCertificateSecretRef"
            files.append(("certificate", where, SecretKeyRef(name=name, key="tls.crt")))
            files.append(("key", where, SecretKeyRef(name=name, key="tls.key")))
        return files

    @model_validator(mode="after")
    def _one_topic(self) -> Self:
        if (self.topic is None) == (self.topic_expression is None):
            raise ValueError(
                "output.kafka: set exactly one of topic (a fixed topic) and topicExpression (CEL over "
                "event, e.g. 'usage.' + event.type)"
            )
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
            (
                "(self.type == 'kafka') == has(self.kafka)",
                "output.kafka is required for type kafka and applies to it only: set output.kafka "
                "(bootstrapServers, topic) with type kafka, or remove it",
            ),
            (
                "(self.type == 'kafka') != has(self.url)",
                "output.url is required for the HTTP outputs and does not apply to type kafka: set url, "
                "or for kafka remove it and list the brokers in output.kafka.bootstrapServers",
            ),
        )
    )

    type: OutputType = Field(
        description="Where events go: openmeter, flexprice, lago, cloudevents (HTTP APIs) or kafka."
    )
    url: HttpUrl | None = Field(
        default=None,
        description="Base URL of the billing API, e.g. https://openmeter.cloud; not for type kafka.",
    )
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
    kafka: KafkaOutputSpec | None = Field(
        default=None, description="Options of type kafka: brokers, topic, record format, TLS and SASL."
    )

    @model_validator(mode="after")
    def _options_match_the_type(self) -> Self:
        for name, applies_to in (("cloudevents", OutputType.CLOUDEVENTS), ("lago", OutputType.LAGO)):
            if getattr(self, name) is not None and self.type is not applies_to:
                raise ValueError(
                    f"output.{name} applies to type {applies_to.value} only; remove it or change output.type"
                )
        if (self.type is OutputType.KAFKA) != (self.kafka is not None):
            raise ValueError(
                "output.kafka is required for type kafka and applies to it only: set output.kafka "
                "(bootstrapServers, topic) with type kafka, or remove it"
            )
        if (self.type is OutputType.KAFKA) == (self.url is not None):
            raise ValueError(
                "output.url is required for the HTTP outputs and does not apply to type kafka: set url, "
                "or for kafka remove it and list the brokers in output.kafka.bootstrapServers"
            )
        return self

    def http_url(self) -> str:
        """``url`` of an HTTP output (the validators above guarantee it is set)."""
        if self.url is None:
            raise ValueError(f"output.url is required for type {self.type.value}")
        return self.url

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
    kubelet_ca_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description=(
            "Secret key holding the CA bundle that verifies the kubelets' serving certificates (for "
            "kubeletUsage meters). Unset: the cluster CA (the ServiceAccount's ca.crt), which signs "
            "kubelet serving certificates issued through CSRs (serverTLSBootstrap)."
        ),
    )
    gateway_url: HttpUrl | None = Field(
        default=None,
        description=(
            "Where agents send their events. Unset means the gateway Service's DNS name, "
            "http://<collector>-gateway.<namespace>.svc:8480. Set it where agents cannot resolve cluster "
            "DNS or reach Service IPs, e.g. http://127.0.0.1:8480 with hostNetwork on a single node "
            "(docs/install.md, hostNetwork mode)."
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
            "Unset, the operator generates a random token in Secret <collector>-ingest-token (key "
            "token), owned by the Collector and kept across resyncs: ingest is never open."
        ),
    )
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict,
        json_schema_extra={"maxProperties": 32},
        description="Gateway pods run only on nodes with these labels; empty means any node.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Taints gateway pods tolerate."
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
    host_network: bool = Field(
        default=False,
        description=(
            "Run agent and gateway pods in their node's network namespace (hostNetwork), bound to the "
            "node's address instead of 0.0.0.0, for clusters where pods have no pod network to each "
            "other or to the API server. Off by default; the pods then need the Pod Security level "
            "privileged (docs/security.md, Pod Security)."
        ),
    )

    @model_validator(mode="after")
    def _ingest_token_in_its_own_secret(self) -> Self:
        token, credentials = self.gateway.ingest_token_secret_ref, self.output.credentials_secret_ref
        if token is not None and credentials is not None and token.name == credentials.name:
            raise ValueError(_INGEST_TOKEN_OWN_SECRET)
        return self
