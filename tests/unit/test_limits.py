"""``kernel.limits``: the one check of storable JSON and of durations, and the errors
that name the offending path."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import pytest
from pydantic import BaseModel

from treadle.kernel.errors import (
    InvalidInputError,
    TreadleValidationError,
    describe_exception,
)
from treadle.kernel.limits import (
    MAX_DEPTH,
    MAX_DURATION,
    MAX_INT,
    MIN_INT,
    check_json,
    precheck,
    to_duration,
    to_json,
)
from treadle.kernel.text import safe_text


def nested(levels: int) -> Any:
    """``levels`` arrays inside each other around a 0."""
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


class Color(StrEnum):
    RED = "red"


STORABLE: list[Any] = [
    None,
    True,
    0,
    MIN_INT,
    MAX_INT,
    -0.0,
    1.7976931348623157e308,
    "",
    "caf\u00e9 \U0001f600 \u2028",  # non-ASCII, a surrogate *pair*, a line separator
    "\x01\x1f",
    {"a": [1, 2.5, {"b": None}]},
    ("tuple", "items"),
    Color.RED,
    nested(MAX_DEPTH),
]


@pytest.mark.parametrize("value", STORABLE, ids=repr)
def test_storable_values_pass(value: Any) -> None:
    """Every JSON value within the limits passes, at the deepest allowed nesting too."""
    check_json(value, "input")
    assert precheck(value, "input")


@pytest.mark.parametrize(
    ("value", "path", "problem"),
    [
        ("a\x00b", "input", "NUL character"),
        ({"items": [{}, {}, {}, {"name": "x\x00"}]}, "input.items[3].name", "NUL character"),
        ({"a\x00": 1}, "input['a\\x00']", "object key contains a NUL character"),
        ("\ud800", "input", "lone surrogate"),
        (["ok", {"k": "\udfff"}], "input[1].k", "lone surrogate"),
        ({"\udc80": 1}, "input['\\udc80']", "object key contains a lone surrogate"),
        (float("nan"), "input", "nan is not a JSON number"),
        ({"x": [float("-inf")]}, "input.x[0]", "-inf is not a JSON number"),
        (MAX_INT + 1, "input", "64-bit"),
        ([MIN_INT - 1], "input[0]", "64-bit"),
        (10**400, "input", "64-bit"),
        (nested(MAX_DEPTH + 1), "input[0][0][0][0]...[0][0]", f"deeper than {MAX_DEPTH}"),
        ({"with space": {1: "x"}}, "input['with space']", "object key 1 is not a string"),
        (datetime(2026, 1, 1, tzinfo=UTC), "input", "datetime is not a JSON value"),
    ],
)
def test_unstorable_values_are_refused_naming_the_path(value: Any, path: str, problem: str) -> None:
    """Each rule has its own message, after the path from the field to the bad value."""
    with pytest.raises(InvalidInputError) as info:
        check_json(value, "input", InvalidInputError, what="invalid input for workflow 'w'")
    assert info.value.errors[0][0] == path
    assert problem in info.value.errors[0][1]
    assert str(info.value).startswith(f"invalid input for workflow 'w': {path}: ")
    # The message itself is storable: an output's error becomes the stage's error column.
    check_json(str(info.value), "error")


def test_a_very_deep_value_is_refused_without_recursing_through_it() -> None:
    """100,000 levels (Python's json would raise RecursionError) stop at the limit."""
    with pytest.raises(TreadleValidationError, match="deeper than"):
        check_json(nested(100_000), "payload")


def test_precheck_lets_other_types_through_for_the_dump_to_settle() -> None:
    """Before pydantic: a model or a datetime is left for its JSON form to be checked, but
    NaN in plain data is caught, since pydantic would dump it as null."""

    class Point(BaseModel):
        x: float

    assert not precheck({"p": Point(x=1.0), "when": datetime(2026, 1, 1, tzinfo=UTC)}, "input")
    with pytest.raises(TreadleValidationError, match=r"input\.p\.x: nan"):
        precheck({"p": {"x": float("nan")}}, "input")
    assert to_json({"p": Point(x=1.5)}, "payload") == {"p": {"x": 1.5}}
    with pytest.raises(TreadleValidationError, match=r"payload\.p\.x: inf is not a JSON number"):
        to_json({"p": Point(x=float("inf"))}, "payload")


def test_error_text_is_escaped_rather_than_refused() -> None:
    """Errors Treadle stores on its own account escape NUL and lone surrogates."""
    assert safe_text("a\x00b\ud800") == "a\\x00b\\ud800"
    assert describe_exception(ValueError("bad \x00 byte")) == "ValueError: bad \\x00 byte"
    check_json(describe_exception(ValueError("\udc80\x00")), "error")


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (1e15, "at most 3653 days"),
        (timedelta.max, "at most 3653 days"),
        (MAX_DURATION + timedelta(seconds=1), "at most 3653 days"),
        (0, "positive"),
        (timedelta(seconds=-1), "positive"),
        ("1h", "a timedelta or a number of seconds"),
        (True, "a timedelta or a number of seconds"),
    ],
)
def test_durations_are_bounded(value: Any, problem: str) -> None:
    """NaN, infinity, zero, negative and longer than ten years: refused, naming it."""
    with pytest.raises(ValueError, match="execution_timeout must") as info:
        to_duration(value, "execution_timeout")
    assert problem in str(info.value)


def test_durations_within_the_bounds() -> None:
    """Numbers mean seconds; ten years is the longest; ``least`` relaxes the sign."""
    assert to_duration(1.5, "t") == timedelta(seconds=1.5)
    assert to_duration(MAX_DURATION, "t") == MAX_DURATION
    assert to_duration(0, "t", least="zero") == timedelta(0)
    assert to_duration(-5, "t", least="any") == timedelta(seconds=-5)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e15, timedelta.max])
def test_definitions_refuse_durations_out_of_range(bad: Any) -> None:
    """At definition time: a workflow's execution_timeout and a stage's timeout are a
    DefinitionError naming the workflow or stage and the option; RetryPolicy's delays a
    pydantic error naming the field (not a ValueError or OverflowError later)."""
    from pydantic import ValidationError

    from treadle import RetryPolicy, define_stage, workflow
    from treadle.kernel.errors import DefinitionError

    with pytest.raises(DefinitionError, match=r"workflow 'capped': execution_timeout must"):
        workflow(id="capped", input=Any, execution_timeout=bad)
    with pytest.raises(DefinitionError, match=r"stage 'slow': timeout must"):
        define_stage(id="slow", input=Any, output=Any, timeout=bad)(lambda ctx: None)
    with pytest.raises(ValidationError, match="max_delay"):
        RetryPolicy(max_delay=bad)
