"""Values from a Prometheus text exposition, read with prometheus_client's own parser.

A registered counter prints ``# HELP`` even at zero, so a test that only looks for a metric's name
cannot fail; tests read the value instead.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def sample_value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels``; KeyError if none is
    exposed (a renamed metric fails the test rather than reading as 0)."""
    total, found = 0.0, False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
                found = True
    if not found:
        raise KeyError(f"no sample {name}{labels or ''} in the exposition")
    return total
