"""Sources: what this node's pods hold and use, turned into per-window readings.

One module per source behind :class:`kubemeter.sources.base.Source`. Adding a source (NVML,
Prometheus, Run:ai) means one new module and one entry in :mod:`kubemeter.agent.meters`; no other
source changes.
"""

from kubemeter.sources.base import PodRecord, Reading, Source

__all__ = ["PodRecord", "Reading", "Source"]
