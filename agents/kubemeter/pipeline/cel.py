"""CEL, compiled once per expression, evaluated over plain JSON-like maps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import celpy
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.celparser import CELParseError
from celpy.evaluation import CELEvalError


class CelError(ValueError):
    """An expression that does not compile or cannot be evaluated; the message names it."""


_environment = celpy.Environment()


def to_native(value: Any) -> Any:
    """CEL values back to JSON-able Python (celtypes subclass the builtins, but bool is an int)."""
    if isinstance(value, celtypes.BoolType):
        return bool(value)
    if isinstance(value, celtypes.IntType | celtypes.UintType):
        return int(value)
    if isinstance(value, celtypes.DoubleType):
        return float(value)
    if isinstance(value, celtypes.StringType):
        return str(value)
    if isinstance(value, Mapping):
        return {str(to_native(k)): to_native(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_native(item) for item in value]
    if isinstance(value, celtypes.TimestampType | celtypes.DurationType):
        return str(value)
    return value


class Expression:
    def __init__(self, text: str, where: str) -> None:
        self.text = text
        self.where = where
        try:
            self._program = _environment.program(_environment.compile(text))
        except CELParseError as error:
            raise CelError(f"{where}: {text!r} is not valid CEL ({error}); see https://cel.dev") from error

    def evaluate(self, variables: Mapping[str, Any]) -> Any:
        """The value, or :class:`CelError` with the reason (a missing key, a type error)."""
        try:
            result = self._program.evaluate({name: json_to_cel(value) for name, value in variables.items()})
        except CELEvalError as error:
            raise CelError(
                f"{self.where}: {self.text!r} failed: {error.args[0] if error.args else error}"
            ) from error
        if isinstance(result, CELEvalError):
            raise CelError(f"{self.where}: {self.text!r} failed: {result.args[0] if result.args else result}")
        return to_native(result)
