"""Does a CEL expression compile, and does it use only the variables it will be given?

The API server cannot know which variables an expression sees, so the operator compiles each one
and evaluates it once against a sample of its inputs: a parse error or an unknown name (``evnt``,
``pods``) is reported; errors that depend on data (a missing label) are not. The evaluation runs
under the agents' step budget (kubemeter.pipeline.cel): an expression that would hang an agent
cannot hang this check either, and is reported as over the budget."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from celpy import celparser, evaluation
from celpy.adapter import json_to_cel
from kubemeter.pipeline.cel import CelBudgetExceeded, compile_program, run_program

METER_VARIABLES = ("pod", "namespace", "node")
PROCESSOR_VARIABLES = ("event",)
DEVICE_VARIABLES = ("device",)  # a DRA device selector, as in a DeviceClass

_UNDECLARED = re.compile(r"undeclared reference to '([^']+)'")

_SAMPLES: dict[str, Any] = {
    "pod": {
        "metadata": {"name": "sample", "namespace": "sample", "uid": "0", "labels": {}, "annotations": {}},
        "spec": {"nodeName": "node-0", "containers": []},
    },
    "namespace": {"metadata": {"name": "sample", "labels": {}, "annotations": {}}},
    "node": {"metadata": {"name": "node-0", "labels": {}, "annotations": {}}},
    "device": {"driver": "gpu.nvidia.com", "attributes": {"gpu.nvidia.com": {}}, "capacity": {}},
    "event": {
        "id": "0",
        "source": "kubemeter/sample",
        "type": "sample",
        "subject": "sample",
        "time": "2024-01-01T00:01:00Z",
        "data": {
            "value": 1.0,
            "unit": "seconds",
            "window_start": "2024-01-01T00:00:00Z",
            "window_end": "2024-01-01T00:01:00Z",
            "namespace": "sample",
            "pod": "sample",
            "node": "node-0",
            "complete": True,
        },
    },
}


@lru_cache(maxsize=8192)
def expression_error(expression: str, variables: tuple[str, ...]) -> str | None:
    """None when ``expression`` is usable with ``variables``; otherwise what is wrong and the fix."""
    try:
        program = compile_program(expression)
    except celparser.CELParseError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "syntax error"
        return f"does not compile ({first_line}); check the CEL syntax"
    activation = {name: json_to_cel(_SAMPLES[name]) for name in variables}
    try:
        result = run_program(program, activation)
    except CelBudgetExceeded as error:
        return f"is over the CEL cost budget: {error}"
    except evaluation.CELEvalError as error:
        return _undeclared(str(error), variables)
    except Exception:  # cel-python raises plain errors for some type mismatches: data-dependent
        return None
    if isinstance(result, evaluation.CELEvalError):
        return _undeclared(str(result), variables)
    return None


def _undeclared(error_text: str, variables: tuple[str, ...]) -> str | None:
    match = _UNDECLARED.search(error_text)
    if match is None:
        return None
    return f"uses unknown name '{match.group(1)}'; it can use only {', '.join(variables)}"
