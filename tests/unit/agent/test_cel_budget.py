"""CEL has a cost limit: nested comprehensions are refused by the model (as by the API server, in
tests/integration/operator/test_cel_cost.py) and any interpreted evaluation stops at the step budget,
so an expression cannot hang an agent or the operator's check."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubemeter.api.common import CEL_MAX_COMPREHENSIONS
from kubemeter.api.meter import MeterSpec
from kubemeter.pipeline.cel import CEL_STEP_BUDGET, CelBudgetExceeded, CelError, Expression
from kubemeter.pipeline.subject import UNKNOWN_SUBJECT, EventShaper
from kubemeter_operator.celcheck import METER_VARIABLES, expression_error
from pydantic import ValidationError

TEN = "[0,1,2,3,4,5,6,7,8,9]"
# Issue #14's attack: 190 characters, five nested map/all over 10-element lists, 10^5 iterations of
# the body: without a limit celpy runs it for minutes (four levels alone took 13 s here).
ATTACK = (
    f"{TEN}.map(a,{TEN}.map(b,{TEN}.map(c,{TEN}.map(d,{TEN}.all(e,"
    "a+b+c+d+e>=0 && pod.metadata.name != 'attack')))))"
)
VARIABLES: dict[str, Any] = {
    "pod": {"metadata": {"name": "p", "labels": {"team": "ml"}}, "spec": {"containers": []}},
    "namespace": {"metadata": {"name": "n", "labels": {}}},
    "node": {"metadata": {"name": "node-0", "labels": {}}},
}


def test_the_attack_stops_at_the_step_budget_in_the_agent() -> None:
    started = time.monotonic()
    with pytest.raises(CelBudgetExceeded, match=f"stopped after {CEL_STEP_BUDGET} evaluation steps"):
        Expression(ATTACK, "meter m: spec.subject.expression").evaluate(VARIABLES)
    print(f"attack stopped after {time.monotonic() - started:.2f} s")  # a figure, not an assertion


def test_an_over_budget_subject_falls_back_and_flags_the_event() -> None:
    shaper = EventShaper("m", ATTACK, None, {"team": "pod.metadata.labels['team']", "bad": ATTACK})
    subject, problem = shaper.subject_for(VARIABLES)
    assert subject == UNKNOWN_SUBJECT
    assert problem is not None and "CEL cost budget" in problem and "spec.subject.expression" in problem
    values, problems = shaper.dimensions_for(VARIABLES)
    assert values == {"team": "ml"}, "the other dimensions are still computed"
    assert len(problems) == 1 and "spec.dimensions.bad" in problems[0]
    with_fallback = EventShaper("m", ATTACK, "acme", {})
    assert with_fallback.subject_for(VARIABLES) == ("acme", None)


def test_an_over_budget_expression_does_not_swallow_the_budget_in_short_circuits() -> None:
    # ||, && and exists() bottle up celpy's own errors and go on; the budget must still stop them.
    text = f"{TEN}.exists(a, {TEN}.exists(b, a + b < 0)) || {ATTACK}"
    with pytest.raises(CelBudgetExceeded):
        Expression(text, "x").evaluate(VARIABLES)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pod.spec.containers.exists(c, c.name == 'main') ? 'gpu' : 'cpu'", "cpu"),
        ("[1, 2, 3].map(x, x * 2).filter(y, y > 2).size() == 2", True),
        ("pod.metadata.labels.all(k, k != '') && has(pod.metadata.labels.team)", True),
    ],
)
def test_realistic_expressions_fit_the_budget(text: str, expected: Any) -> None:
    assert Expression(text, "x").evaluate(VARIABLES) == expected


def test_two_comprehensions_over_long_lists_stop_at_the_budget() -> None:
    # Allowed at apply (two comprehensions), but 200 x 200 iterations: stopped, not run.
    long_list = "[" + ",".join(["1"] * 200) + "]"
    text = f"{long_list}.all(a, {long_list}.all(b, a == b))"
    with pytest.raises(CelBudgetExceeded):
        Expression(text, "x").evaluate(VARIABLES)
    failure = expression_error(text, METER_VARIABLES)
    assert failure is not None and "over the CEL cost budget" in failure


def test_the_operator_check_reports_the_attack_instead_of_hanging() -> None:
    failure = expression_error(ATTACK, METER_VARIABLES)
    assert failure is not None and "over the CEL cost budget" in failure


def test_the_model_refuses_more_than_two_comprehensions() -> None:
    base = {"eventType": "e", "unit": "u", "source": {"allocation": {"resource": "cpu"}}}
    with pytest.raises(ValidationError, match=f"more than {CEL_MAX_COMPREHENSIONS} comprehensions"):
        MeterSpec.model_validate({**base, "subject": {"expression": ATTACK}})
    with pytest.raises(ValidationError, match="comprehensions"):
        MeterSpec.model_validate({**base, "dimensions": {"x": ATTACK}})
    two = "pod.spec.containers.map(c, c.name).exists(n, n == 'main') ? 'a' : 'b'"
    assert MeterSpec.model_validate({**base, "subject": {"expression": two}}).subject.expression == two


def test_a_compile_error_is_still_a_cel_error() -> None:
    with pytest.raises(CelError, match="not valid CEL"):
        Expression("pod.metadata.name +", "x")
