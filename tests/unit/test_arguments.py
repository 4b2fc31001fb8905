"""The facades check their arguments in one place (``kernel.arguments``): ``TestEngine``
refuses what ``Engine`` refuses, with the same ``TreadleValidationError``."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import Engine, WorkflowBuilder, define_stage
from treadle.kernel.errors import TreadleValidationError
from treadle.testing import TestEngine


class In(BaseModel):
    n: int


@define_stage(id="echo", input=In, output=In)
async def echo(ctx: Any) -> In:
    return ctx.input  # type: ignore[no-any-return]


WF = WorkflowBuilder("echo", input=In).pipe(echo).build()


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"priority": -3}, "priority"),
        ({"priority": 101}, "priority"),
        ({"priority": "high"}, "priority"),
        ({"config": ["not", "a", "mapping"]}, "config"),
        ({"search_attributes": 3}, "search_attributes"),
        ({"execution_timeout": float("nan")}, "execution_timeout"),
        ({"execution_timeout": timedelta.max}, "execution_timeout"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"run_id": "r\x00"}, "run_id"),
    ],
)
async def test_test_engine_start_refuses_what_engine_start_refuses(
    arguments: dict[str, Any], field: str
) -> None:
    """``TestEngine.start(..., priority=-3)`` and friends raise the TreadleValidationError
    ``Engine.start`` raises (not pydantic's ValidationError), naming the same field, and
    write nothing."""
    te = TestEngine([WF])
    with pytest.raises(TreadleValidationError) as test_engine_error:
        await te.start("echo", {"n": 1}, **arguments)
    async with await Engine.open("memory://", workflows=[WF]) as engine:
        with pytest.raises(TreadleValidationError) as engine_error:
            await engine.start("echo", {"n": 1}, **arguments)
        assert await engine.list() == []
    assert type(test_engine_error.value) is type(engine_error.value)
    assert test_engine_error.value.errors == engine_error.value.errors
    assert test_engine_error.value.errors[0][0] == field
    assert str(test_engine_error.value).replace("TestEngine.", "Engine.") == str(engine_error.value)
    assert te.persistence.runs == {}
