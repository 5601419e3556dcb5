"""Pure builders: a Collector and its resolved Meters in, Kubernetes manifests out. No I/O here."""

from __future__ import annotations

from collections.abc import Sequence

from kubemeter.api.collector import CollectorSpec
from kubemeter.api.rendered import ResolvedMeter

from kubemeter_operator.builders.agent import get_agent_daemonset
from kubemeter_operator.builders.common import CollectorRef, Manifest, content_hash
from kubemeter_operator.builders.configmap import (
    get_config_map,
    render_agent_config,
    render_gateway_config,
    with_ingest_token,
)
from kubemeter_operator.builders.gateway import (
    get_gateway_headless_service,
    get_gateway_pod_disruption_budget,
    get_gateway_service,
    get_gateway_statefulset,
)
from kubemeter_operator.builders.rbac import (
    get_agent_cluster_role_binding,
    get_agent_service_account,
    get_gateway_service_account,
)
from kubemeter_operator.settings import OperatorSettings

__all__ = ["CollectorRef", "Manifest", "build_children"]


def build_children(
    collector: CollectorRef,
    spec: CollectorSpec,
    meters: Sequence[ResolvedMeter],
    settings: OperatorSettings,
    agent_secret_names: Sequence[str] = (),
) -> list[Manifest]:
    """Every object a Collector owns, in the order they should be applied (RBAC and config first),
    but for the generated ingest token Secret, which is created once (reconcile.py)."""
    spec = with_ingest_token(collector, spec)
    agent_config = render_agent_config(collector, spec, meters, settings.cluster_name)
    gateway_config = render_gateway_config(collector, spec, settings.cluster_name)
    gateway_config_hash = content_hash(gateway_config.to_wire())
    # The agents' forwarder sends the gateway's ingest token, so its Secret is mounted into agents too.
    token = spec.gateway.ingest_token_secret_ref
    agent_secrets = [*agent_secret_names, token.name] if token else list(agent_secret_names)
    return [
        get_agent_service_account(collector),
        get_gateway_service_account(collector),
        get_agent_cluster_role_binding(collector),
        get_config_map(collector, agent_config, gateway_config),
        get_gateway_service(collector),
        get_gateway_headless_service(collector),
        get_gateway_pod_disruption_budget(collector),
        get_gateway_statefulset(collector, spec, settings, gateway_config_hash),
        get_agent_daemonset(
            collector,
            spec,
            settings,
            agent_secret_names=agent_secrets,
            needs_pod_resources=any(meter.spec.source.nvml is not None for meter in meters),
        ),
    ]
