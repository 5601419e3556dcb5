"""GPU usage from NVML on the node, attributed to pods through PodResources and /proc cgroups."""

from kubemeter.sources.nvml.edge import NvmlEdge, NvmlSnapshot, NvmlUnavailableError
from kubemeter.sources.nvml.source import NvmlSource, resolver_from_pods

__all__ = [
    "NvmlEdge",
    "NvmlSnapshot",
    "NvmlSource",
    "NvmlUnavailableError",
    "resolver_from_pods",
]
