"""``basis: maxRequestUsage``: per window, the larger of what a pod reserved and what it used.

Both sides are integrals over the window in the same unit: CPU core-seconds (the request times the
time held, against the kubelet counter's increase), memory byte-seconds (the request times the time
held, against the working set integrated over the window, i.e. its mean times the time). Comparing
integrals, not instantaneous values, keeps the result independent of the sampling interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal


@dataclass(frozen=True)
class BilledUsage:
    value: Decimal
    basis: str  # "request" or "usage": which side won this window
    complete: bool
    incomplete_reason: str | None = None


def larger_of_request_and_usage(
    requested: Decimal, used: Decimal | None, usage_problem: str | None = None
) -> BilledUsage:
    """``max(requested, used)``; without usage data the request is billed and flagged."""
    if used is None:
        reason = usage_problem or "no kubelet usage for the pod in this window"
        return BilledUsage(requested, "request", False, f"{reason}; billed the request alone")
    if used > requested:
        return BilledUsage(used, "usage", usage_problem is None, usage_problem)
    return BilledUsage(requested, "request", usage_problem is None, usage_problem)
