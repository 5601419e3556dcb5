"""Process-wide operator state, created in the startup handler: the API edge, the reconciler, the
queue, and the kopf indexes (live caches of Meters, Pipelines, Collectors and workloads)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubemeter_operator.kube import KubeApi
from kubemeter_operator.reconcile import NamespaceQueue, NamespaceSnapshot, Reconciler, WorkloadCounts
from kubemeter_operator.resolve import ObjectView
from kubemeter_operator.settings import OperatorSettings

INDEX_NAMES = ("collector_index", "pipeline_index", "meter_index", "daemonset_index", "statefulset_index")


@dataclass
class Runtime:
    settings: OperatorSettings
    api: KubeApi
    reconciler: Reconciler
    queue: NamespaceQueue
    indexes: dict[str, Mapping[Any, Iterable[Any]]] = field(default_factory=dict)

    def remember_indexes(self, handler_kwargs: Mapping[str, Any]) -> None:
        for name in INDEX_NAMES:
            if name in handler_kwargs:
                self.indexes[name] = handler_kwargs[name]

    def _values(self, index_name: str, namespace: str) -> list[Any]:
        index = self.indexes.get(index_name)
        if index is None or namespace not in index:
            return []
        return list(index[namespace])

    def snapshot(self, namespace: str) -> NamespaceSnapshot:
        agents = dict(self._values("daemonset_index", namespace))
        gateways = dict(self._values("statefulset_index", namespace))
        return NamespaceSnapshot(
            namespace=namespace,
            collectors=list[ObjectView](self._values("collector_index", namespace)),
            pipelines=list[ObjectView](self._values("pipeline_index", namespace)),
            meters=list[ObjectView](self._values("meter_index", namespace)),
            agents={str(name): WorkloadCounts(*counts) for name, counts in agents.items()},
            gateways={str(name): WorkloadCounts(*counts) for name, counts in gateways.items()},
        )


_current: Runtime | None = None


def install(runtime: Runtime) -> None:
    global _current
    _current = runtime


def current() -> Runtime:
    if _current is None:
        raise RuntimeError(
            "the operator runtime is not started; handlers run only under `kubemeter operator`"
        )
    return _current
