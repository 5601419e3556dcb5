"""CEL, compiled once per expression, evaluated over plain JSON-like maps.

Most subject and dimension expressions are plain paths (``namespace.metadata.labels["team"]``), a
label with a default (``'team' in pod.metadata.labels ? pod.metadata.labels['team'] : ''``), and
most ``set`` values plain string literals. Those are evaluated directly, and the CEL interpreter
(celpy with its parser, ~10 MiB of an agent's memory) is imported only when some expression needs
more than that.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from typing import Any


class CelError(ValueError):
    """An expression that does not compile or cannot be evaluated; the message names it."""


_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_STEP = rf"""\.{_IDENT}|\[\s*"[^"\\]*"\s*\]|\[\s*'[^'\\]*'\s*\]"""
_PATH = re.compile(rf"\s*(?P<root>{_IDENT})(?P<steps>(?:{_STEP})*)\s*")
_STEPS = re.compile(rf"\.(?P<field>{_IDENT})|\[\s*(?P<quote>[\"'])(?P<key>.*?)(?P=quote)\s*\]")
# CEL words that are not variables: a "path" starting with one is left to the interpreter.
_RESERVED = frozenset({"true", "false", "null", "in", "as", "break", "const", "continue", "else", "for"})


_LITERAL = re.compile(r"""\s*(?:'(?P<single>[^'\\]*)'|"(?P<double>[^"\\]*)")\s*""")


def string_literal_of(text: str) -> str | None:
    """The value of a plain string literal without escapes (``'eu-west-1'``), or None."""
    match = _LITERAL.fullmatch(text)
    if match is None:
        return None
    return match["single"] if match["single"] is not None else match["double"]


def path_of(text: str) -> tuple[str, list[str]] | None:
    """``root`` and the keys of a plain path expression, or None for anything else."""
    match = _PATH.fullmatch(text)
    if match is None or match["root"] in _RESERVED:
        return None
    keys = [step["field"] or step["key"] for step in _STEPS.finditer(match["steps"])]
    return match["root"], keys


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    """``text`` split at each ``separator`` that is not inside a quoted string."""
    parts: list[str] = []
    current: list[str] = []
    quote = ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == separator:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


Operand = tuple[str, list[str]] | str  # a path (root, keys) or a string literal


def operand_of(text: str) -> Operand | None:
    literal = string_literal_of(text)
    return literal if literal is not None else path_of(text)


def conditional_of(text: str) -> tuple[str, tuple[str, list[str]], Operand, Operand] | None:
    """``'key' in PATH ? THEN : ELSE`` (THEN and ELSE paths or string literals), the usual way to
    default a label, as (key, container path, then, else); None for anything else."""
    condition_rest = _split_outside_quotes(text, "?")
    if len(condition_rest) != 2:
        return None
    branches = _split_outside_quotes(condition_rest[1], ":")
    membership = re.fullmatch(r"\s*('[^'\\]*'|\"[^\"\\]*\")\s+in\s+(.+)", condition_rest[0])
    if len(branches) != 2 or membership is None:
        return None
    key, container = string_literal_of(membership[1]), path_of(membership[2])
    then, otherwise = operand_of(branches[0]), operand_of(branches[1])
    if key is None or container is None or then is None or otherwise is None:
        return None
    return key, container, then, otherwise


@cache
def _environment() -> Any:
    import celpy  # loaded only when an expression needs it

    return celpy.Environment()


def to_native(value: Any) -> Any:
    """CEL values back to JSON-able Python (celtypes subclass the builtins, but bool is an int)."""
    from celpy import celtypes

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
        self._simple = operand_of(text)
        self._conditional = conditional_of(text) if self._simple is None else None
        self._program: Any = None
        if self._simple is not None or self._conditional is not None:
            return
        from celpy.celparser import CELParseError

        environment = _environment()
        try:
            self._program = environment.program(environment.compile(text))
        except CELParseError as error:
            raise CelError(f"{where}: {text!r} is not valid CEL ({error}); see https://cel.dev") from error

    def evaluate(self, variables: Mapping[str, Any]) -> Any:
        """The value, or :class:`CelError` with the reason (a missing key, a type error)."""
        if self._simple is not None:
            return self._operand(variables, self._simple)
        if self._conditional is not None:
            key, container_path, then, otherwise = self._conditional
            container = self._walk(variables, *container_path)
            if not isinstance(container, Mapping | list):
                raise CelError(f"{self.where}: {self.text!r} failed: no such overload for 'in'")
            return self._operand(variables, then if key in container else otherwise)
        from celpy.adapter import json_to_cel
        from celpy.evaluation import CELEvalError

        try:
            result = self._program.evaluate({name: json_to_cel(value) for name, value in variables.items()})
        except CELEvalError as error:
            raise CelError(
                f"{self.where}: {self.text!r} failed: {error.args[0] if error.args else error}"
            ) from error
        if isinstance(result, CELEvalError):
            raise CelError(f"{self.where}: {self.text!r} failed: {result.args[0] if result.args else result}")
        return to_native(result)

    def _operand(self, variables: Mapping[str, Any], operand: Operand) -> Any:
        return operand if isinstance(operand, str) else self._walk(variables, *operand)

    def _walk(self, variables: Mapping[str, Any], root: str, keys: list[str]) -> Any:
        """CEL's meaning of a path over JSON maps: every step must exist (no implicit null)."""
        if root not in variables:
            raise CelError(f"{self.where}: {self.text!r} failed: undeclared reference to {root!r}")
        value = variables[root]
        for key in keys:
            if not isinstance(value, Mapping):
                raise CelError(f"{self.where}: {self.text!r} failed: {key!r} selected on a non-map")
            if key not in value:
                raise CelError(f"{self.where}: {self.text!r} failed: no such key: {key!r}")
            value = value[key]
        return value
