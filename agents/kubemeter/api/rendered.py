"""The files the operator renders into each Collector's ConfigMap, and the status reports the
operator reads from agents and gateways."""

from __future__ import annotations

import yaml
from pydantic import Field

from kubemeter.api.collector import BufferSpec, OutputSpec
from kubemeter.api.common import SpecModel
from kubemeter.api.meter import MeterSpec
from kubemeter.api.pipeline import ProcessorSpec

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
# With hostNetwork, agents and gateways bind the pod (= node) address it holds, not 0.0.0.0.
POD_IP_ENV = "KUBEMETER_POD_IP"

# Ports. The gateway serves ingest, /healthz, /metrics and /status on one port; the agent serves
# /healthz and /metrics.
GATEWAY_PORT = 8480
AGENT_METRICS_PORT = 9464
HEALTH_PATH = "/healthz"
# Probes: liveness asks only whether the process serves (never the API server, so an API-server outage
# restarts nothing); readiness asks whether it can do its work right now.
LIVENESS_PATH = "/livez"
READINESS_PATH = "/readyz"
METRICS_PATH = "/metrics"
GATEWAY_STATUS_PATH = "/status"
# Agents push their source faults to the gateway they already send events to (authenticated like
# ingest); the operator reads them from the gateways' /status, O(gateway replicas) per resync.
AGENT_REPORT_PATH = "/api/v1/agent-reports"
FAULT_REPORT_REFRESH_SECONDS = 60.0
FAULT_REPORT_TTL_SECONDS = 3 * FAULT_REPORT_REFRESH_SECONDS

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
    fault_report_refresh_seconds: float = Field(
        default=FAULT_REPORT_REFRESH_SECONDS,
        gt=0,
        description=(
            "The agent posts its source faults to the gateway when they change, and again this often "
            "while it has any (the gateway forgets a report after agentReportTtlSeconds)."
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
    kafka_files: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Files of output.kafka's mounted Secrets by role: username, password, ca, certificate, key."
        ),
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
    agent_report_ttl_seconds: float = Field(
        default=FAULT_REPORT_TTL_SECONDS,
        gt=0,
        description=(
            "How long an agent's fault report is kept without a newer one; a faulted agent re-posts "
            "more often (faultReportRefreshSeconds), so only a gone agent's report expires."
        ),
    )

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_wire(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> GatewayConfig:
        return cls.model_validate(yaml.safe_load(text))


class AgentFaultReport(SpecModel):
    """What an agent posts to ``AGENT_REPORT_PATH`` on its gateway: when its source faults change
    (an empty map clears them), and every ``faultReportRefreshSeconds`` while it has any."""

    node: str = Field(min_length=1, max_length=253, description="The node the agent runs on.")
    sent_at: float = Field(
        description="Unix seconds on the agent's clock: orders one node's reports across gateway replicas."
    )
    source_faults: dict[str, str] = Field(
        default_factory=dict,
        max_length=256,
        description="Meter (namespace/name) -> why its source is behind; empty when nothing is.",
    )


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
    agent_reports: list[AgentFaultReport] = Field(
        default_factory=list,
        description="The latest fault report of each agent that posted here within the TTL.",
    )
    agent_reports_complete: bool = Field(
        default=False,
        description=(
            "True once the gateway has run for half the report TTL: every faulted agent has re-posted "
            "since it started, so a node missing here has no fault (as far as this replica knows)."
        ),
    )


class AgentStatusReport(SpecModel):
    """The JSON body of ``GET /healthz`` on an agent (for people and probes; the operator learns the
    source faults from the gateways, see :class:`AgentFaultReport`)."""

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
