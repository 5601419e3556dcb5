"""PromQL for exact metering: one series selector, scoped to this node, read as raw samples.

``rate()``/``increase()`` extrapolate to the window edges and ``query_range`` re-samples with a
5-minute lookback, so neither gives billable numbers. An instant query of a *range selector*
(``selector[90s]``) returns each stored sample with its own timestamp; kubemeter does the counter and
gauge arithmetic itself, so resets and gaps are seen and flagged.
"""

from __future__ import annotations

import re

NODE_PLACEHOLDER = "$node"

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SELECTOR = re.compile(rf"^\s*(?P<name>{_NAME})?\s*(?:\{{(?P<matchers>.*)\}})?\s*$", re.DOTALL)


class QueryError(ValueError):
    """The query cannot be metered exactly; the message says how to write it."""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def node_scoped_selector(query: str, node_label: str, node: str) -> str:
    """``DCGM_FI_DEV_FB_USED{pod!=""}`` → ``DCGM_FI_DEV_FB_USED{Hostname="n1",pod!=""}``.

    A query that already names the node with ``$node`` gets it substituted instead (for selectors
    where the node is in a label other than ``nodeLabel``).
    """
    text = query.strip()
    match = _SELECTOR.match(text)
    if match is None or not (match.group("name") or match.group("matchers")):
        raise QueryError(
            f"spec.source.prometheus.query {query!r} is not a series selector. kubemeter reads raw "
            "samples and does the counter/gauge arithmetic itself, so write a selector such as "
            'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{pod!=""}, not rate()/increase()/sum(); for a '
            "derived series, record it with a Prometheus recording rule and select that."
        )
    if NODE_PLACEHOLDER in text:
        return text.replace(NODE_PLACEHOLDER, _escape(node))
    name = match.group("name") or ""
    matchers = (match.group("matchers") or "").strip().rstrip(",")
    node_matcher = f'{node_label}="{_escape(node)}"'
    return f"{name}{{{node_matcher}{', ' + matchers if matchers else ''}}}"


def range_query(selector: str, range_ms: int) -> str:
    """Every raw sample of ``selector`` in ``(time - range, time]``."""
    return f"{selector}[{max(1, range_ms)}ms]"
