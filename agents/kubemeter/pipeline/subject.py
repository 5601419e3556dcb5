"""Subject and dimensions of a meter's events, from CEL over ``pod``, ``namespace`` and ``node``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubemeter.pipeline.cel import CelError, Expression

UNKNOWN_SUBJECT = "unknown"


class EventShaper:
    def __init__(
        self, meter: str, subject_expression: str, fallback: str | None, dimensions: Mapping[str, str]
    ) -> None:
        self.subject = Expression(subject_expression, f"meter {meter}: spec.subject.expression")
        self.fallback = fallback
        self.dimensions = {
            key: Expression(text, f"meter {meter}: spec.dimensions.{key}") for key, text in dimensions.items()
        }

    def subject_for(self, variables: Mapping[str, Any]) -> tuple[str, str | None]:
        """The subject, and why it is not trustworthy (then the event is flagged incomplete)."""
        try:
            value = self.subject.evaluate(variables)
            if isinstance(value, str) and value:
                return value, None
            problem = f"{self.subject.where} gave {value!r}, not a non-empty string"
        except CelError as error:
            problem = str(error)
        if self.fallback:
            return self.fallback, None
        return UNKNOWN_SUBJECT, f"{problem}; set spec.subject.fallback or fix the expression"

    def dimensions_for(self, variables: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Dimension values; a failing expression is left out and reported, the event still goes."""
        values: dict[str, Any] = {}
        problems: list[str] = []
        for key, expression in self.dimensions.items():
            try:
                values[key] = expression.evaluate(variables)
            except CelError as error:
                problems.append(str(error))
        return values, problems
