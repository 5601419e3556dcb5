"""Pieces every custom resource shares: quantities, patterns, selectors, Secret references."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "kubemeter.io"
API_VERSION = "v1alpha1"

# Keys every usage event's data carries; processors may not drop or rename them.
PROTECTED_DATA_KEYS = ("value", "unit", "window_start", "window_end", "namespace", "pod", "node", "complete")

SECONDS_PER_DAY = 86_400
QUANTITY_PATTERN = r"^(\+)?([0-9]+(\.[0-9]*)?|\.[0-9]+)(([KMGTPE]i)|[numkMGTPE]|([eE][-+]?[0-9]+))?$"
_QUANTITY_RE = re.compile(QUANTITY_PATTERN)
_BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL_SUFFIXES = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_DECIMAL_SUFFIXES |= {"P": 1e15, "E": 1e18}

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"  # an RFC 1123 label: a Kubernetes object name
DATA_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"  # an event data key, also a valid CEL identifier
HTTP_URL_PATTERN = r"^https?://[^\s/$.?#][^\s]*$"


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, str) and not _QUANTITY_RE.match(value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity; write for example 10Gi, 500Mi or 250m")
    return value


def quantity_to_number(value: int | str) -> float:
    """A Kubernetes quantity (``10Gi``, ``250m``, ``1e3``, ``4``) as a plain number."""
    text = str(_check_quantity(value))
    for suffix, factor in _BINARY_SUFFIXES.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    if text[-1:] in _DECIMAL_SUFFIXES and not text[-1:].isdigit():
        return float(text[:-1]) * _DECIMAL_SUFFIXES[text[-1]]
    return float(text)  # plain or exponent form


def quantity_to_bytes(value: int | str) -> int:
    """A storage quantity in bytes, rounded up (a 1.5Ki buffer holds 1536 bytes)."""
    number = quantity_to_number(value)
    return int(number) if number == int(number) else int(number) + 1


Quantity = Annotated[
    int | str,
    AfterValidator(_check_quantity),
    Field(json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": QUANTITY_PATTERN}),
]
# CEL cost at apply: comprehensions (all, exists, exists_one, map, filter) are the only loops in CEL
# and nested ones multiply (five nested over 10-element lists: 10^5 iterations, minutes in the
# agent). The API server counts them with this pattern (RE2 in the CRD rule, the same in the model);
# what is left (two over long lists) is stopped by the agents' step budget (kubemeter.pipeline.cel).
CEL_MAX_COMPREHENSIONS = 2
CEL_COMPREHENSION_PATTERN = r"\.\s*(all|exists_one|exists|map|filter)\s*\("
_COMPREHENSION_RE = re.compile(CEL_COMPREHENSION_PATTERN)
CEL_COMPREHENSIONS_MESSAGE = (
    f"more than {CEL_MAX_COMPREHENSIONS} comprehensions (all, exists, exists_one, map, filter): nested "
    "ones multiply the evaluation cost in every agent; iterate once (test a label with 'in' or has(), "
    "combine conditions inside one exists) or compute the value in a Pipeline processor"
)


def _check_comprehensions(value: str) -> str:
    if len(_COMPREHENSION_RE.findall(value)) > CEL_MAX_COMPREHENSIONS:
        raise ValueError(CEL_COMPREHENSIONS_MESSAGE)
    return value


def _cel_string(pattern: str) -> str:
    return "'" + pattern.replace("\\", "\\\\").replace("'", "\\'") + "'"


CelExpression = Annotated[
    str,
    AfterValidator(_check_comprehensions),
    Field(
        min_length=1,
        max_length=1024,
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"self.findAll({_cel_string(CEL_COMPREHENSION_PATTERN)}).size() "
                    f"<= {CEL_MAX_COMPREHENSIONS}",
                    "message": CEL_COMPREHENSIONS_MESSAGE,
                }
            ]
        },
    ),
]
HttpUrl = Annotated[
    str, Field(pattern=HTTP_URL_PATTERN, max_length=2048, json_schema_extra={"format": "uri"})
]
ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=NAME_PATTERN)]
DataKey = Annotated[str, Field(min_length=1, max_length=63, pattern=DATA_KEY_PATTERN)]


def cel_rules(*rules: tuple[str, str]) -> dict[str, Any]:
    """``x-kubernetes-validations`` for a model: (CEL rule, message that names the field and the fix)."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in rules]}


class SpecModel(BaseModel):
    """Base of every wire model: camelCase aliases, snake_case attributes, unknown fields refused."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")

    def to_wire(self) -> dict[str, Any]:
        """The JSON/YAML form, camelCase, without unset optional fields."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# ---------------------------------------------------------------------------------------------------
# Shared pieces


class LabelSelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(SpecModel):
    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "self.operator in ['In', 'NotIn'] ? has(self.values) && size(self.values) > 0 "
                ": !has(self.values) || size(self.values) == 0",
                "matchExpressions: operator In and NotIn need at least one entry in values; "
                "Exists and DoesNotExist take no values",
            )
        )
    )

    key: str = Field(min_length=1, max_length=316, description="The label key the requirement applies to.")
    operator: LabelSelectorOperator = Field(
        description="How the key relates to the values: In, NotIn, Exists or DoesNotExist."
    )
    values: list[Annotated[str, Field(max_length=63)]] = Field(
        default_factory=list,
        max_length=64,
        description="Label values; required for In and NotIn, empty for Exists and DoesNotExist.",
    )

    @model_validator(mode="after")
    def _values_match_operator(self) -> Self:
        needs_values = self.operator in (LabelSelectorOperator.IN, LabelSelectorOperator.NOT_IN)
        if needs_values != bool(self.values):
            raise ValueError(
                f"matchExpressions[key={self.key}]: operator {self.operator.value} "
                + ("needs at least one value" if needs_values else "takes no values; remove values")
            )
        return self


class LabelSelector(SpecModel):
    """A Kubernetes label selector; an empty selector matches everything."""

    match_labels: dict[str, Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict,
        json_schema_extra={"maxProperties": 64},
        description="Labels that must all be present with exactly these values.",
    )
    match_expressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, max_length=32, description="Requirements that must all hold."
    )


class SecretKeyRef(SpecModel):
    name: ObjectName = Field(description="Name of a Secret in the same namespace as this resource.")
    key: str = Field(
        min_length=1, max_length=253, description="The key inside the Secret whose value is the credential."
    )


class SecretRef(SpecModel):
    name: ObjectName = Field(description="Name of a Secret in the same namespace as this resource.")
