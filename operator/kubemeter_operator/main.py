"""``kubemeter operator``: kopf wiring only. The work is in handlers/ (per kind), reconcile.py,
resolve.py and the pure builders/."""

from __future__ import annotations

import argparse
import logging
import random
from collections.abc import Mapping, Sequence
from typing import Any, cast

import kopf
from kubemeter.api.common import API_GROUP, API_VERSION
from prometheus_client import start_http_server

from kubemeter_operator import runtime
from kubemeter_operator.builders.common import MANAGED_BY
from kubemeter_operator.handlers import collector, meter, pipeline, workload
from kubemeter_operator.kube import KubeApi
from kubemeter_operator.reconcile import NamespaceQueue, Reconciler
from kubemeter_operator.settings import OperatorSettings

SETTINGS = OperatorSettings.from_env()
MANAGED = {"app.kubernetes.io/managed-by": MANAGED_BY}
PEERING_NAME = "kubemeter"


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Progress and diff-base in annotations: status belongs to our typed schema (kopf's would be pruned).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    # One ClusterKopfPeering in every mode, also when only listed namespaces are watched (--namespace):
    # kopf would otherwise look for a namespaced KopfPeering, which kubemeter does not install.
    settings.peering.clusterwide = True
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 60
    settings.watching.client_timeout = 90
    settings.networking.request_timeout = 30
    settings.execution.max_workers = 4

    def post_event(target: Mapping[str, Any], event_type: str, reason: str, message: str) -> None:
        kopf.event(cast(Any, dict(target)), type=event_type, reason=reason, message=message)

    api = KubeApi()
    reconciler = Reconciler(api, SETTINGS, post_event)
    state = runtime.Runtime(
        SETTINGS, api, reconciler, NamespaceQueue(lambda ns: state.snapshot(ns), reconciler)
    )
    runtime.install(state)


@kopf.on.probe(id="pending_namespaces")
def probe_pending(**_: Any) -> int:
    return len([task for task in runtime.current().queue._tasks.values() if not task.done()])


# Caches (kopf indexes) of everything a reconciliation reads; handlers run only once they are full,
# so the first reconciliation after a restart sees every object and writes nothing new.
kopf.index(API_GROUP, API_VERSION, "collectors")(collector.collector_index)
kopf.index(API_GROUP, API_VERSION, "pipelines")(pipeline.pipeline_index)
kopf.index(API_GROUP, API_VERSION, "meters")(meter.meter_index)
kopf.index("apps", "v1", "daemonsets", labels=MANAGED)(workload.daemonset_index)
kopf.index("apps", "v1", "statefulsets", labels=MANAGED)(workload.statefulset_index)

kopf.on.event(API_GROUP, API_VERSION, "collectors")(collector.collector_event)
kopf.on.event(API_GROUP, API_VERSION, "pipelines")(pipeline.pipeline_event)
kopf.on.event(API_GROUP, API_VERSION, "meters")(meter.meter_event)
kopf.on.event("apps", "v1", "daemonsets", labels=MANAGED)(workload.workload_event)
kopf.on.event("apps", "v1", "statefulsets", labels=MANAGED)(workload.workload_event)
kopf.timer(API_GROUP, API_VERSION, "collectors", interval=SETTINGS.resync_seconds, idle=None)(
    collector.collector_resync
)
kopf.on.delete(API_GROUP, API_VERSION, "collectors")(collector.collector_deleted)


def run(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="kubemeter operator", description=__doc__)
    parser.add_argument("--namespace", "-n", action="append", default=[], help="watch only these namespaces")
    parser.add_argument("--standalone", action="store_true", help="no peering (a single replica, or tests)")
    parser.add_argument("--priority", type=int, default=None, help="peering priority; random by default")
    parser.add_argument("--liveness-port", type=int, default=8080, help="/healthz port; 0 disables it")
    parser.add_argument(
        "--metrics-port", type=int, default=9090, help="Prometheus /metrics port; 0 disables it"
    )
    parser.add_argument(
        "--listen-host",
        default="0.0.0.0",
        help="address of /healthz and /metrics (hostNetwork pods bind their pod IP, not every interface)",
    )
    parser.add_argument("--verbose", "-v", action="store_true")
    parser.add_argument("--log-format", choices=["plain", "full", "json"], default="full")
    args = parser.parse_args(list(argv))

    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()])
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.listen_host)
    # Two replicas must not both act: the higher priority one runs, the other pauses until it goes.
    priority = args.priority if args.priority is not None else random.randint(1, 2**31 - 1)
    kopf.run(
        standalone=args.standalone,
        priority=priority,
        peering_name=None if args.standalone else PEERING_NAME,  # a name makes peering mandatory
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=(
            f"http://{args.listen_host}:{args.liveness_port}/healthz" if args.liveness_port else None
        ),
    )
    return 0
