"""The agents' source-fault reports, as one gateway replica last heard them.

Agents post a report when their fault set changes and re-post it while it is not empty, so the
operator learns every agent's faults from the gateways' ``/status`` (one request per replica)
instead of asking every agent (one request per node, every resync). A report nobody refreshes (an
agent or node gone) expires after the TTL; a cleared report is kept as long, so that it outranks an
older fault the same node reported to another replica.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kubemeter.api.rendered import AgentFaultReport

# Distinct nodes kept: a bound on memory whatever an ingest-token holder posts.
MAX_NODES = 20_000
MAX_REASON_CHARS = 1024


class AgentReportTable:
    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._started_s = clock()
        self._reports: dict[str, tuple[float, AgentFaultReport]] = {}  # node -> (received at, report)

    def record(self, report: AgentFaultReport) -> bool:
        """Keep ``report`` unless this node's kept one is newer; False when the table is full."""
        self._expire()
        kept = self._reports.get(report.node)
        if kept is not None and kept[1].sent_at > report.sent_at:
            return True  # a late retry of an older report
        if kept is None and len(self._reports) >= MAX_NODES:
            return False
        faults = {meter: reason[:MAX_REASON_CHARS] for meter, reason in report.source_faults.items()}
        self._reports.pop(report.node, None)  # re-inserted last: the dict stays in order of receipt
        self._reports[report.node] = (self._clock(), report.model_copy(update={"source_faults": faults}))
        return True

    def live(self) -> list[AgentFaultReport]:
        """Every report younger than the TTL, by node."""
        self._expire()
        return [report for _, (_, report) in sorted(self._reports.items())]

    def complete(self) -> bool:
        """Up for half the TTL: every faulted agent has re-posted since this replica started."""
        return self._clock() - self._started_s >= self.ttl_s / 2

    def _expire(self) -> None:
        """Drop the reports older than the TTL: the oldest come first, so stop at the first young one."""
        horizon_s = self._clock() - self.ttl_s
        while self._reports:
            node, (received_s, _) = next(iter(self._reports.items()))
            if received_s >= horizon_s:
                return
            del self._reports[node]
