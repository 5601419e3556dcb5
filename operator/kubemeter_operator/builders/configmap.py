"""The ConfigMap with the resolved ``agent.yaml`` and ``gateway.yaml``.

Agents watch the mounted file and reload it, so Meter and Pipeline edits reach them without a
restart; the gateway restarts on change (its pod template carries the hash of ``gateway.yaml``)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from kubemeter.api.collector import CollectorSpec
from kubemeter.api.common import SecretKeyRef, quantity_to_bytes
from kubemeter.api.rendered import (
    AGENT_CONFIG_FILENAME,
    GATEWAY_CONFIG_FILENAME,
    GATEWAY_PORT,
    SECRETS_DIR,
    AgentConfig,
    GatewayConfig,
    ResolvedMeter,
)

from kubemeter_operator.builders.common import CollectorRef, Manifest, metadata

AGENT_STATE_DIR = "/var/lib/kubemeter"
AGENT_SPOOL_DIR = f"{AGENT_STATE_DIR}/spool"
AGENT_CHECKPOINT_DIR = f"{AGENT_STATE_DIR}/checkpoints"
GATEWAY_DATA_DIR = "/var/lib/kubemeter/gateway"
# The queue may fill this share of the volume; the rest is headroom for the database's own files.
BUFFER_USABLE_FRACTION = 0.9


def gateway_url(collector: CollectorRef, spec: CollectorSpec | None = None) -> str:
    """The Service's DNS name, unless the Collector names another address (spec.agent.gatewayUrl)."""
    if spec is not None and spec.agent.gateway_url:
        return str(spec.agent.gateway_url).rstrip("/")
    return f"http://{collector.gateway_name}.{collector.namespace}.svc:{GATEWAY_PORT}"


def secret_dir(secret_name: str) -> str:
    return f"{SECRETS_DIR}/{secret_name}"


GENERATED_TOKEN_KEY = "token"


def generated_token_secret_name(collector_name: str) -> str:
    """The ingest token Secret the operator generates when gateway.ingestTokenSecretRef is unset."""
    return f"{collector_name}-ingest-token"


def with_ingest_token(collector: CollectorRef, spec: CollectorSpec) -> CollectorSpec:
    """``spec`` with gateway.ingestTokenSecretRef filled in: ingest is always authenticated, with the
    named Secret or, unset, the one the operator generates for this Collector."""
    if spec.gateway.ingest_token_secret_ref is not None:
        return spec
    generated = SecretKeyRef(name=generated_token_secret_name(collector.name), key=GENERATED_TOKEN_KEY)
    return spec.model_copy(
        update={"gateway": spec.gateway.model_copy(update={"ingest_token_secret_ref": generated})}
    )


def get_generated_token_secret(collector: CollectorRef) -> Manifest:
    """A random token, created once (never applied over: a resync must not change it), owned by the
    Collector so it goes with it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(collector, generated_token_secret_name(collector.name), "ingest-token"),
        "type": "Opaque",
        "stringData": {GENERATED_TOKEN_KEY: secrets.token_urlsafe(32)},
    }


def ingest_token_file(spec: CollectorSpec) -> str | None:
    """Where agents and gateways read the ingest token; the same path in both pods."""
    reference = spec.gateway.ingest_token_secret_ref
    return f"{secret_dir(reference.name)}/{reference.key}" if reference else None


def render_agent_config(
    collector: CollectorRef, spec: CollectorSpec, meters: Sequence[ResolvedMeter], cluster_name: str
) -> AgentConfig:
    return AgentConfig(
        cluster=cluster_name,
        collector=collector.name,
        namespace=collector.namespace,
        meters=sorted(meters, key=lambda meter: meter.name),
        gateway_url=gateway_url(collector, spec),
        interval_seconds=spec.agent.interval_seconds,
        spool_dir=AGENT_SPOOL_DIR,
        checkpoint_dir=AGENT_CHECKPOINT_DIR,
        ingest_token_file=ingest_token_file(spec),
    )


def render_gateway_config(collector: CollectorRef, spec: CollectorSpec, cluster_name: str) -> GatewayConfig:
    secret = spec.output.credentials_secret_ref
    return GatewayConfig(
        cluster=cluster_name,
        collector=collector.name,
        namespace=collector.namespace,
        output=spec.output,
        credentials_file=f"{secret_dir(secret.name)}/{secret.key}" if secret else None,
        kafka_files={
            role: f"{secret_dir(ref.name)}/{ref.key}"
            for role, _, ref in (spec.output.kafka.secret_files() if spec.output.kafka else [])
        },
        buffer=spec.buffer,
        buffer_max_bytes=max(1, int(quantity_to_bytes(spec.buffer.size) * BUFFER_USABLE_FRACTION)),
        data_dir=GATEWAY_DATA_DIR,
        ingest_token_file=ingest_token_file(spec),
    )


def get_config_map(
    collector: CollectorRef, agent_config: AgentConfig, gateway_config: GatewayConfig
) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(collector, collector.config_name, "config"),
        "data": {
            AGENT_CONFIG_FILENAME: agent_config.to_yaml(),
            GATEWAY_CONFIG_FILENAME: gateway_config.to_yaml(),
        },
    }
