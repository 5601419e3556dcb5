"""Level-triggered reconciliation of one namespace: read the cached Meters, Pipelines and Collectors,
resolve them, apply every Collector's children and write the statuses that changed.

Any change to any kubemeter object in a namespace schedules one reconciliation of that namespace;
a burst of changes (500 Meters applied at once) coalesces into a few runs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubemeter.api.rendered import GATEWAY_PORT, GATEWAY_STATUS_PATH, GatewayStatusReport
from kubernetes.client.exceptions import ApiException

from kubemeter_operator.builders import build_children
from kubemeter_operator.builders.common import CollectorRef
from kubemeter_operator.builders.configmap import (
    GENERATED_TOKEN_KEY,
    generated_token_secret_name,
    get_generated_token_secret,
)
from kubemeter_operator.builders.rbac import get_agent_cluster_role
from kubemeter_operator.kube import KubeApi
from kubemeter_operator.metrics import DEGRADED_OBJECTS, RECONCILE_SECONDS, RECONCILES, STATUS_WRITES
from kubemeter_operator.resolve import ObjectView, Problem, referenced_secrets, resolve_namespace
from kubemeter_operator.settings import OperatorSettings
from kubemeter_operator.status import (
    DEGRADED,
    collector_status,
    condition,
    meter_status,
    pipeline_status,
    status_changed,
    transition_events,
)

log = logging.getLogger("kubemeter.operator")

# (event target body, type, reason, message)
PostEvent = Callable[[Mapping[str, Any], str, str, str], None]


@dataclass(frozen=True)
class WorkloadCounts:
    """Desired and ready pods of a Collector's DaemonSet or StatefulSet, from the watch cache."""

    desired: int
    ready: int

    @classmethod
    def from_daemonset(cls, body: Mapping[str, Any]) -> WorkloadCounts:
        status = body.get("status") or {}
        return cls(int(status.get("desiredNumberScheduled") or 0), int(status.get("numberReady") or 0))

    @classmethod
    def from_statefulset(cls, body: Mapping[str, Any]) -> WorkloadCounts:
        status = body.get("status") or {}
        desired = int((body.get("spec") or {}).get("replicas") or 0)
        return cls(desired, int(status.get("readyReplicas") or 0))


@dataclass
class NamespaceSnapshot:
    namespace: str
    collectors: list[ObjectView] = field(default_factory=list)
    pipelines: list[ObjectView] = field(default_factory=list)
    meters: list[ObjectView] = field(default_factory=list)
    agents: dict[str, WorkloadCounts] = field(default_factory=dict)  # collector name -> counts
    gateways: dict[str, WorkloadCounts] = field(default_factory=dict)


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class Reconciler:
    def __init__(self, api: KubeApi, settings: OperatorSettings, post_event: PostEvent) -> None:
        self.api = api
        self.settings = settings
        self.post_event = post_event
        self.gateway_reports: dict[tuple[str, str], list[GatewayStatusReport]] = {}
        self._degraded: dict[tuple[str, str], int] = {}  # (namespace, kind) -> count

    def reconcile(self, snapshot: NamespaceSnapshot, refresh: bool = False) -> None:
        """Bring one namespace to its desired state. ``refresh`` re-reads children and gateway stats."""
        started = time.monotonic()
        namespace = snapshot.namespace
        if refresh:
            self.api.forget()
        secret_names = referenced_secrets(snapshot.collectors, snapshot.meters)
        secrets = {name: self.api.secret_keys(namespace, name) for name in sorted(secret_names)}
        self._generate_ingest_tokens(snapshot, secrets)
        resolution = resolve_namespace(snapshot.collectors, snapshot.pipelines, snapshot.meters, secrets)
        now = now_utc()

        writes = 0
        if any(not collector.deleting for collector in snapshot.collectors):
            writes += self.api.apply(get_agent_cluster_role())
        for collector in snapshot.collectors:
            if collector.deleting:
                continue
            problems = list(resolution.collector_problems.get(collector.name, []))
            spec = resolution.collector_specs.get(collector.name)
            meters = resolution.collector_meters.get(collector.name, [])
            if spec is not None:
                ref = CollectorRef(namespace=namespace, name=collector.name, uid=collector.uid)
                children = build_children(
                    ref,
                    spec,
                    meters,
                    self.settings,
                    resolution.collector_secret_names.get(collector.name, []),
                )
                try:
                    for child in children:
                        writes += self.api.apply(child)
                except ApiException as error:
                    problems.insert(0, _apply_problem(collector.name, error))
                if refresh:
                    self.gateway_reports[(namespace, collector.name)] = self._read_gateway_reports(
                        namespace, collector.name
                    )
            agents = snapshot.agents.get(collector.name, WorkloadCounts(0, 0))
            gateway = snapshot.gateways.get(collector.name, WorkloadCounts(0, 0))
            desired = collector_status(
                collector.status,
                collector.generation,
                problems,
                spec.gateway.replicas if spec else 0,
                len(meters),
                {"desired": agents.desired, "ready": agents.ready},
                {"desired": gateway.desired, "ready": gateway.ready},
                self.gateway_reports.get((namespace, collector.name)) or None,
                now,
            )
            self._write_status(collector, desired)

        for pipeline in snapshot.pipelines:
            desired = pipeline_status(
                pipeline.status,
                pipeline.generation,
                resolution.pipeline_problems.get(pipeline.name, []),
                str(pipeline.spec.get("collectorRef", "")),
                resolution.pipeline_meters.get(pipeline.name, []),
                now,
            )
            self._write_status(pipeline, desired)

        for meter in snapshot.meters:
            desired = meter_status(
                meter.status,
                meter.generation,
                resolution.meter_problems.get(meter.name, []),
                resolution.meter_sources.get(meter.name),
                resolution.meter_collectors.get(meter.name, []),
                now,
            )
            self._write_status(meter, desired)

        self._count_degraded(namespace, snapshot, resolution.collector_problems)
        log.info("namespace %s reconciled: %d child writes (refresh=%s)", namespace, writes, refresh)
        RECONCILE_SECONDS.observe(time.monotonic() - started)
        RECONCILES.labels(outcome="success").inc()

    def _generate_ingest_tokens(self, snapshot: NamespaceSnapshot, secrets: dict[str, Any]) -> None:
        """Authenticated ingest by default: a Collector without gateway.ingestTokenSecretRef gets a
        random token Secret, created once and kept (a resync finds it and leaves it alone)."""
        for collector in snapshot.collectors:
            if collector.deleting or (collector.spec.get("gateway") or {}).get("ingestTokenSecretRef"):
                continue
            name = generated_token_secret_name(collector.name)
            if secrets.get(name) is not None:
                continue
            ref = CollectorRef(namespace=snapshot.namespace, name=collector.name, uid=collector.uid)
            try:
                self.api.create_if_absent(get_generated_token_secret(ref))
            except ApiException as error:
                log.warning(
                    "could not create Secret %s/%s: %s %s", snapshot.namespace, name, error.reason, error.body
                )
                continue  # reported as SecretNotFound on the Collector
            secrets[name] = frozenset({GENERATED_TOKEN_KEY})

    def _write_status(self, target: ObjectView, desired: dict[str, Any]) -> None:
        if not status_changed(target.status, desired):
            return
        payload = dict(desired)
        for key in ("buffer", "deliveredEvents", "deadLetteredEvents", "lastDeliveryError", "source"):
            payload.setdefault(key, None)  # merge patch: None removes what we no longer report
        if target.kind != "Collector":
            for key in ("buffer", "deliveredEvents", "deadLetteredEvents", "lastDeliveryError"):
                payload.pop(key, None)
        if target.kind != "Meter":
            payload.pop("source", None)
        try:
            self.api.patch_status(target.kind, target.namespace, target.name, payload)
        except ApiException as error:
            if error.status == 404:
                return  # deleted meanwhile
            raise
        STATUS_WRITES.labels(kind=target.kind).inc()
        for note in transition_events(target.status, desired):
            self.post_event(target.event_target(), note.type, note.reason, note.message)

    def _count_degraded(
        self, namespace: str, snapshot: NamespaceSnapshot, collector_problems: Mapping[str, Sequence[Problem]]
    ) -> None:
        del collector_problems  # the statuses just written already say it; count from them next time
        for kind, objects in (
            ("Collector", snapshot.collectors),
            ("Pipeline", snapshot.pipelines),
            ("Meter", snapshot.meters),
        ):
            count = sum(1 for item in objects if condition(item.status, DEGRADED).get("status") == "True")
            self._degraded[(namespace, kind)] = count
            DEGRADED_OBJECTS.labels(kind=kind).set(
                sum(value for (_, each_kind), value in self._degraded.items() if each_kind == kind)
            )

    def _read_gateway_reports(self, namespace: str, collector: str) -> list[GatewayStatusReport]:
        """Ask each running gateway pod for its buffer, delivery counts and the agents' source
        faults; one that does not answer is left out."""
        selector = f"app.kubernetes.io/instance={collector},app.kubernetes.io/component=gateway"
        pods = self.api.list("v1", "Pod", namespace, selector)
        return read_gateway_reports(gateway_status_urls(pods), self.settings.gateway_status_timeout_seconds)


def gateway_status_urls(pods: Sequence[Mapping[str, Any]], port: int = GATEWAY_PORT) -> list[str]:
    """``/status`` of every gateway pod with an IP (an unready one still reports its buffer)."""
    addresses = [(pod.get("status") or {}).get("podIP") for pod in pods]
    return [f"http://{address}:{port}{GATEWAY_STATUS_PATH}" for address in addresses if address]


def read_gateway_reports(urls: Sequence[str], timeout_s: float) -> list[GatewayStatusReport]:
    """The gateways' reports; one that does not answer is left out (its last numbers are kept).

    The agents' source faults come with them: agents push changes to their gateway, so a resync
    asks the gateway replicas, not every agent (which cost 0.76 ms of operator CPU per agent and
    resync, bench/bench_operator.py)."""
    import httpx

    reports: list[GatewayStatusReport] = []
    # One client per round, and no CA bundle: the gateways serve plain HTTP inside the cluster, and
    # loading the bundle cost 33 ms of CPU per client here, more than the whole read.
    with httpx.Client(timeout=timeout_s, trust_env=False, verify=False) as client:
        for url in urls:
            try:
                response = client.get(url)
                response.raise_for_status()
                reports.append(GatewayStatusReport.model_validate(response.json()))
            except Exception as error:  # unreachable or not yet serving
                log.debug("gateway at %s did not report: %s", url, error)
    return reports


def _apply_problem(collector: str, error: ApiException) -> Problem:
    detail = error.body if isinstance(error.body, str) else str(error.reason)
    return Problem(
        "ApplyFailed",
        f'Collector "{collector}": the API server refused a child object ({error.status}): {detail[:500]}; '
        "check the spec fields it names",
    )


class NamespaceQueue:
    """Coalesces reconciliation requests per namespace and runs each namespace one at a time."""

    def __init__(
        self,
        snapshot: Callable[[str], NamespaceSnapshot],
        reconciler: Reconciler,
        debounce_seconds: float = 0.2,
        max_backoff_seconds: float = 30.0,
    ) -> None:
        self._snapshot = snapshot
        self._reconciler = reconciler
        self._debounce = debounce_seconds
        self._max_backoff = max_backoff_seconds
        self._dirty: set[str] = set()
        self._refresh: set[str] = set()
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def request(self, namespace: str, refresh: bool = False) -> None:
        self._dirty.add(namespace)
        if refresh:
            self._refresh.add(namespace)
        task = self._tasks.get(namespace)
        if task is None or task.done():
            self._tasks[namespace] = asyncio.get_running_loop().create_task(self._run(namespace))

    async def _run(self, namespace: str) -> None:
        backoff_seconds = 0.5
        while namespace in self._dirty:
            await asyncio.sleep(self._debounce)
            self._dirty.discard(namespace)
            refresh = namespace in self._refresh
            self._refresh.discard(namespace)
            snapshot = self._snapshot(namespace)  # taken on the loop: the caches are not thread-safe
            try:
                await asyncio.to_thread(self._reconciler.reconcile, snapshot, refresh)
                backoff_seconds = 0.5
            except Exception:
                RECONCILES.labels(outcome="error").inc()
                log.exception(
                    "reconciling namespace %s failed; retrying in %.1f s", namespace, backoff_seconds
                )
                self._dirty.add(namespace)
                await asyncio.sleep(backoff_seconds)
                backoff_seconds = min(backoff_seconds * 2, self._max_backoff)

    async def idle(self) -> None:
        """Wait until no reconciliation is pending (for tests and shutdown)."""
        while any(not task.done() for task in self._tasks.values()):
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
