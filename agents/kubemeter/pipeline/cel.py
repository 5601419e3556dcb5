"""CEL, compiled once per expression, evaluated over plain JSON-like maps.

Most subject and dimension expressions are plain paths (``namespace.metadata.labels["team"]``), a
label with a default (``'team' in pod.metadata.labels ? pod.metadata.labels['team'] : ''``), and
most ``set`` values plain string literals. Those are evaluated directly, and the CEL interpreter
(celpy with its parser, ~10 MiB of an agent's memory) is imported only when some expression needs
more than that.

Every interpreted evaluation has a step budget (:data:`CEL_STEP_BUDGET` visits of the parse tree,
shared by the nested evaluations of ``map``/``all``/``exists``/``filter``): nested comprehensions
multiply, and a 150-character expression of five nested ``map``/``all`` over 10-element lists takes
about 10^6 steps (minutes in celpy). Over the budget an evaluation stops with :class:`CelError`
instead, in the agent and in the operator's check alike. The API server refuses expressions with
more than :data:`kubemeter.api.common.CEL_MAX_COMPREHENSIONS` comprehensions at apply.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from typing import Any

# ~25,000 steps/s in celpy on one core (tests/unit/agent/test_cel_budget.py prints it): an
# evaluation stops within about half a second. Realistic subjects take tens of steps (a path: 5-10, a
# label default: ~20, ``exists`` over 5 containers: ~80).
CEL_STEP_BUDGET = 10_000


class CelError(ValueError):
    """An expression that does not compile or cannot be evaluated; the message names it."""


class CelBudgetExceeded(CelError):
    """The evaluation took more than :data:`CEL_STEP_BUDGET` steps and was stopped."""


class _OverBudget(Exception):
    """Raised inside celpy (which catches its own CELEvalError in ``||``, ``&&`` and macros, and
    would go on iterating); not a CELEvalError, so nothing in the interpreter swallows it."""


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
    from celpy.evaluation import Evaluator

    class BudgetedEvaluator(Evaluator):
        """Counts every visit of a parse-tree node; the macros' nested evaluators share the count."""

        def __init__(self, ast: Any, activation: Any, steps: list[int] | None = None) -> None:
            super().__init__(ast, activation)
            self.steps = steps if steps is not None else [0]

        def _visit_tree(self, tree: Any) -> Any:
            self.steps[0] += 1
            if self.steps[0] > CEL_STEP_BUDGET:
                raise _OverBudget
            return super()._visit_tree(tree)

        def sub_evaluator(self, ast: Any) -> Any:
            return BudgetedEvaluator(ast, self.activation, self.steps)

    class BudgetedRunner(celpy.InterpretedRunner):
        def evaluate(self, context: Any) -> Any:
            return BudgetedEvaluator(self.ast, self.new_activation()).evaluate(context)

    return celpy.Environment(runner_class=BudgetedRunner)


def release_parser() -> None:
    """Drop the CEL parser; programs already compiled keep working, the next compile builds it anew.

    Compiled programs walk their own parse trees, but celpy keeps its parser (the LALR tables) in a
    class attribute for ever: 4.5 MiB of an agent's RSS once built (52.7 -> 57.2 MiB; 1.2 MiB of it
    comes back after gc and malloc_trim, the rest stays in reused heap). Rebuilding it for a config
    reload takes about 0.3 s.
    """
    if _environment.cache_info().currsize:
        from celpy.celparser import CELParser

        CELParser.CEL_PARSER = None
        _environment.cache_clear()


def compile_program(text: str) -> Any:
    """A celpy program with the step budget; raises celpy's CELParseError."""
    environment = _environment()
    return environment.program(environment.compile(text))


def run_program(program: Any, activation: Mapping[str, Any]) -> Any:
    """``program`` evaluated over CEL values; :class:`CelBudgetExceeded` when it runs over budget."""
    try:
        return program.evaluate(activation)
    except _OverBudget:
        raise CelBudgetExceeded(
            f"stopped after {CEL_STEP_BUDGET} evaluation steps (the CEL cost budget); nested "
            "map/all/exists/filter multiply: iterate once, or test labels with 'in' and has()"
        ) from None


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

        try:
            self._program = compile_program(text)
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
            result = run_program(self._program, {k: json_to_cel(v) for k, v in variables.items()})
        except CelBudgetExceeded as error:
            raise CelBudgetExceeded(f"{self.where}: {self.text!r} {error}") from None
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
