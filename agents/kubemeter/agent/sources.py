"""The one place that maps a meter's ``spec.source`` to a source module.

The GPU and external sources pull in heavy libraries (grpc for PodResources, pynvml, httpx), so each
is imported inside its branch: an agent that runs only allocation and kubelet meters never loads
them and stays small.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubemeter.api.rendered import AgentConfig, ResolvedMeter
from kubemeter.metering.pods import Basis
from kubemeter.metering.windows import Window
from kubemeter.sources.allocation import AllocationSource, MaxRequestUsageSource
from kubemeter.sources.base import PodRecord, Progress, Reading, Source
from kubemeter.sources.kubelet import KubeletPoller, KubeletUsageSource, Metric

if TYPE_CHECKING:
    from kubemeter.agent.meters import World

log = logging.getLogger(__name__)

ErrorCallback = Callable[[str, BaseException], None]


class UnbuildableSource(Progress):
    """Stands in for a source whose construction failed (a CA file that is not there, say): it reports
    the reason as its fault and observes nothing, so only this meter stops, and says why."""

    def __init__(self, reason: str) -> None:
        self.last_error = reason

    async def run(self) -> None:
        await asyncio.Event().wait()

    def readings(self, window: Window, pods: Mapping[str, PodRecord]) -> list[Reading]:
        return []

    def committed(self, window: Window) -> None:
        return None

    def snapshot(self) -> dict[str, Any]:
        return {}

    def restore(self, state: Mapping[str, Any]) -> None:
        return None


def build_source(
    meter: ResolvedMeter,
    world: World,
    config: AgentConfig,
    not_before_ms: int,
    kubelet: KubeletPoller,
    on_error: ErrorCallback = lambda source, error: None,
) -> Source:
    """The source for ``meter`` on this node. Never raises for a source that cannot be built: the
    meter gets an :class:`UnbuildableSource` that says why, and the other meters run on."""
    try:
        return _build(meter, world, config, not_before_ms, kubelet, on_error)
    except Exception as error:
        reason = f"source {meter.spec.source.summary()} could not start: {type(error).__name__}: {error}"
        log.error("meter %s/%s: %s", meter.namespace, meter.name, reason)
        on_error(meter.spec.source.summary().split("/")[0], error)
        return UnbuildableSource(reason)


def _build(
    meter: ResolvedMeter,
    world: World,
    config: AgentConfig,
    not_before_ms: int,
    kubelet: KubeletPoller,
    on_error: ErrorCallback,
) -> Source:
    source = meter.spec.source
    window_ms = meter.spec.window_seconds * 1000
    interval_ms = config.interval_seconds * 1000
    if source.allocation is not None:
        if source.allocation.basis.value == "maxRequestUsage":
            metric: Metric = "cpu" if source.allocation.resource == "cpu" else "memory"
            return MaxRequestUsageSource(
                AllocationSource(world.pods, source.allocation.resource, "requests"),
                KubeletUsageSource(
                    metric, window_ms, interval_ms, not_before_ms, kubelet, zero_readings=True
                ),
            )
        basis: Basis = "limits" if source.allocation.basis.value == "limits" else "requests"
        return AllocationSource(world.pods, source.allocation.resource, basis)
    if source.dra is not None:
        from kubemeter.sources.dra import DeviceFilter, DraSource
        from kubemeter.sources.dra_devices import shared_node_devices

        where = f"meter {meter.namespace}/{meter.name}: spec.source.dra.selector"
        return DraSource(
            shared_node_devices(world, config.interval_seconds, on_error),
            DeviceFilter(source.dra.driver, source.dra.selector, where),
            source.dra.per_device,
        )
    if source.idle is not None:
        from kubemeter.sources.dra import DeviceFilter
        from kubemeter.sources.dra_devices import shared_node_devices
        from kubemeter.sources.idle import IdleSource, shared_node_history

        idle = source.idle
        history = shared_node_history(world, config.interval_seconds, on_error)
        if idle.devices is not None:
            where = f"meter {meter.namespace}/{meter.name}: spec.source.idle.devices.selector"
            return IdleSource(
                history,
                world.pods,
                idle.subject,
                devices=shared_node_devices(world, config.interval_seconds, on_error),
                device_filter=DeviceFilter(idle.devices.driver, idle.devices.selector, where),
            )
        return IdleSource(
            history, world.pods, idle.subject, resource=idle.resource, model_label=idle.model_label
        )
    if source.kubelet_usage is not None:
        return KubeletUsageSource(source.kubelet_usage.metric, window_ms, interval_ms, not_before_ms, kubelet)
    if source.nvml is not None:
        from kubemeter.sources.nvml.source import build as build_nvml

        return build_nvml(
            source.nvml.metric,
            window_ms,
            interval_ms,
            not_before_ms,
            config.pod_resources_socket,
            Path(config.host_proc_dir),
            lambda: world.pods.objects,
            on_error,
        )
    if source.prometheus is not None:
        from kubemeter.sources.prometheus import PrometheusClient, PrometheusConnection, PrometheusSource

        spec = source.prometheus
        credentials = meter.credentials_dir
        connection = PrometheusConnection(
            spec.url,
            headers=dict(spec.headers),
            bearer_token_file=(
                f"{credentials}/{spec.bearer_token_secret_ref.key}"
                if credentials and spec.bearer_token_secret_ref
                else None
            ),
            basic_auth_dir=credentials if spec.basic_auth_secret_ref else None,
            ca_file=spec.tls.ca_file,
            insecure_skip_verify=spec.tls.insecure_skip_verify,
            timeout_s=spec.timeout_seconds,
        )
        return PrometheusSource(
            "counter" if spec.kind.value == "counter" else "gauge",
            spec.query,
            world.node_name,
            PrometheusClient(connection),
            window_ms,
            spec.scrape_interval_seconds * 1000,
            interval_ms,
            not_before_ms,
            node_label=spec.node_label,
            pod_label=spec.pod_label,
            namespace_label=spec.namespace_label,
            # The float as written in the spec (0.001), not its binary expansion.
            value_scale=Decimal(repr(spec.value_scale)),
            on_error=on_error,
        )
    if source.runai is not None:
        from kubemeter.sources.runai import RunaiClient, RunaiSource
        from kubemeter.sources.runai.source import read_credentials

        spec_runai = source.runai
        if meter.credentials_dir is None:
            raise ValueError(
                "no credentials directory for spec.source.runai.credentialsSecretRef; the operator "
                "mounts the Secret and sets credentialsDir"
            )
        credentials_dir = meter.credentials_dir
        return RunaiSource(
            spec_runai.metric,
            world.node_name,
            RunaiClient(spec_runai.url, lambda: read_credentials(credentials_dir)),
            window_ms,
            not_before_ms,
            sample_step_ms=spec_runai.sample_step_seconds * 1000,
            lag_ms=spec_runai.lag_seconds * 1000,
            poll_interval_ms=interval_ms,
            on_error=on_error,
        )
    raise ValueError(f"spec.source {source.chosen_names()} has no agent module")
