"""Plain path expressions are walked without the CEL interpreter, with exactly CEL's result."""

from __future__ import annotations

from typing import Any

import celpy
import pytest
from celpy.adapter import json_to_cel
from kubemeter.pipeline.cel import (
    CelError,
    Expression,
    conditional_of,
    path_of,
    string_literal_of,
    to_native,
)

VARIABLES: dict[str, Any] = {
    "pod": {"metadata": {"name": "train-0", "labels": {"team": "ml", "n": 3}, "annotations": {}}},
    "namespace": {"metadata": {"labels": {"billing.kubemeter.io/customer": "acme"}}},
    "node": {"metadata": {"name": "gpu-1"}},
}

PATHS = [
    'namespace.metadata.labels["billing.kubemeter.io/customer"]',
    "pod.metadata.name",
    "pod.metadata.labels['team']",
    'pod.metadata.labels["n"]',
    "pod.metadata",
    'pod["metadata"].name',
]
MISSING = ['pod.metadata.labels["absent"]', "pod.metadata.annotations.x", "pod.metadata.name.first"]


def interpreted(text: str) -> Any:
    environment = celpy.Environment()
    result = environment.program(environment.compile(text)).evaluate(
        {name: json_to_cel(value) for name, value in VARIABLES.items()}
    )
    if isinstance(result, Exception):
        raise result
    return to_native(result)


@pytest.mark.parametrize("text", PATHS)
def test_a_path_gives_what_the_cel_interpreter_gives(text: str) -> None:
    assert path_of(text) is not None
    assert Expression(text, "test").evaluate(VARIABLES) == interpreted(text)


@pytest.mark.parametrize("text", MISSING)
def test_a_path_that_does_not_exist_fails_as_in_cel(text: str) -> None:
    with pytest.raises(Exception):  # noqa: B017 - celpy raises its own error type
        interpreted(text)
    with pytest.raises(CelError, match="failed"):
        Expression(text, "test").evaluate(VARIABLES)


@pytest.mark.parametrize("text", ["'eu-west-1'", '"acme"', "''"])
def test_a_string_literal_is_its_value_as_in_cel(text: str) -> None:
    assert string_literal_of(text) is not None
    assert Expression(text, "test").evaluate(VARIABLES) == interpreted(text)


CONDITIONALS = [
    "'team' in pod.metadata.labels ? pod.metadata.labels['team'] : ''",
    "'absent' in pod.metadata.labels ? pod.metadata.labels['absent'] : 'unknown'",
    "'billing.kubemeter.io/customer' in namespace.metadata.labels ? "
    "namespace.metadata.labels['billing.kubemeter.io/customer'] : node.metadata.name",
    "'a:b?' in pod.metadata.annotations ? 'yes' : 'no'",
]


@pytest.mark.parametrize("text", CONDITIONALS)
def test_a_label_with_a_default_gives_what_the_cel_interpreter_gives(text: str) -> None:
    assert conditional_of(text) is not None
    assert Expression(text, "test").evaluate(VARIABLES) == interpreted(text)


def test_a_default_over_a_missing_map_fails_as_in_cel() -> None:
    text = "'x' in pod.spec.labels ? 'a' : 'b'"
    with pytest.raises(Exception):  # noqa: B017 - celpy raises its own error type
        interpreted(text)
    with pytest.raises(CelError, match="no such key"):
        Expression(text, "test").evaluate(VARIABLES)


@pytest.mark.parametrize(
    "text",
    [
        "true",
        "'a' in pod.metadata.labels ? size(x) : 'b'",
        "pod.metadata.name == 'x' ? 'a' : 'b'",
        "'a\\'b'",
        "'a' + 'b'",
        "size(pod.metadata.name)",
        'pod.metadata.name + "-x"',
        "has(pod.metadata.x)",
        "a.b == c",
    ],
)
def test_anything_beyond_a_path_goes_to_the_interpreter(text: str) -> None:
    assert path_of(text) is None and string_literal_of(text) is None and conditional_of(text) is None
