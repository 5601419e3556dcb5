"""Pipeline processors, applied in order to each event (the CloudEvent as a map, seen as ``event``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubemeter.pipeline.cel import CelError, Expression


@dataclass
class Processor:
    filter: Expression | None = None
    set: dict[str, Expression] = field(default_factory=dict)
    drop: list[str] = field(default_factory=list)
    rename: dict[str, str] = field(default_factory=dict)

    def apply(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """The changed event, or None when a filter drops it. A failing ``set`` leaves the key unset."""
        data = event["data"]
        if self.filter is not None:
            try:
                keep = self.filter.evaluate({"event": event})
            except CelError:
                keep = True  # an expression that cannot decide never silently drops billable usage
            if keep is False:
                return None
        for key, expression in self.set.items():
            try:
                data[key] = expression.evaluate({"event": event})
            except CelError:
                continue
        for key in self.drop:
            data.pop(key, None)
        for old, new in self.rename.items():
            if old in data:
                data[new] = data.pop(old)
        return event


def compile_processors(specs: Sequence[Any], where: str) -> list[Processor]:
    """From :class:`kubemeter.api.pipeline.ProcessorSpec` objects (anything with those attributes)."""
    processors: list[Processor] = []
    for index, spec in enumerate(specs):
        at = f"{where}.processors[{index}]"
        processors.append(
            Processor(
                filter=Expression(spec.filter, f"{at}.filter") if spec.filter else None,
                set={k: Expression(v, f"{at}.set.{k}") for k, v in (spec.set or {}).items()},
                drop=list(spec.drop or ()),
                rename=dict(spec.rename or {}),
            )
        )
    return processors


def run_processors(processors: Sequence[Processor], event: Mapping[str, Any]) -> dict[str, Any] | None:
    current: dict[str, Any] | None = {**event, "data": dict(event["data"])}
    for processor in processors:
        if current is None:
            return None
        current = processor.apply(current)
    return current
