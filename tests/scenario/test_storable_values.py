"""Values no backend can store (NUL characters, lone surrogates, NaN and infinity, integers
past 64 bits, nesting past ``MAX_DEPTH``, durations past ten years) are refused the same
way on memory, a SQLite file and PostgreSQL: at the call, with a ``TreadleValidationError``
naming the field, and with nothing written; a stage output or step result that breaks
the rules fails that stage or step at once, naming the field, without a retry."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import (
    Engine,
    RetryPolicy,
    RunStatus,
    StageStatus,
    WorkflowBuilder,
    WorkflowContext,
    define_stage,
    workflow,
)
from treadle.kernel.errors import (
    InvalidConfigError,
    InvalidInputError,
    InvalidPayloadError,
    TreadleValidationError,
)
from treadle.kernel.limits import MAX_DEPTH
from treadle.tests.scenario.helpers import run_events, until_status, worker


def nested(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = {"next": value}
    return value


class Label(BaseModel):
    label: str = "plain"


@define_stage(id="echo", input=Any, output=Any, config=Label)
async def echo(ctx: Any) -> Any:
    return ctx.input


@define_stage(id="emit", input=Any, output=Any, retry=RetryPolicy(max_attempts=3, initial_delay=0))
async def emit(ctx: Any) -> Any:
    CALLS["emit"] = CALLS.get("emit", 0) + 1
    return {"text": "before\x00after"}


def nul_result() -> str:
    CALLS["nul_result"] = CALLS.get("nul_result", 0) + 1
    return "a\x00b"


@workflow(id="stepper", input=Any, output=str)
async def stepper(ctx: WorkflowContext, data: Any) -> str:
    policy = RetryPolicy(max_attempts=3, initial_delay=timedelta(seconds=1))
    return str(await ctx.step("nul", nul_result, retry=policy))


@workflow(id="waiter", input=Any, output=Any)
async def waiter(ctx: WorkflowContext, data: Any) -> Any:
    got = await ctx.wait_for_signal("go")
    update = await ctx.wait_for_update("ask")
    await update.reply(update.payload)
    return {"signal": got, "update": update.payload}


CALLS: dict[str, int] = {}
WORKFLOWS = [
    WorkflowBuilder("echo", input=Any).pipe(echo).build(),
    WorkflowBuilder("emit", input=Any).pipe(emit).build(),
    stepper,
    waiter,
]

BAD_VALUES: list[tuple[Any, str, str]] = [
    ({"items": [{}, {}, {}, {"name": "x\x00y"}]}, "input.items[3].name", "NUL character"),
    ({"key\x00": 1}, "input['key\\x00']", "NUL character"),
    (["\ud800"], "input[0]", "lone surrogate"),
    ({"\udc80": 1}, "input['\\udc80']", "lone surrogate"),
    ({"x": float("nan")}, "input.x", "nan is not a JSON number"),
    ([1.0, float("inf")], "input[1]", "inf is not a JSON number"),
    ({"big": 2**64}, "input.big", "64-bit"),
    ({"small": -(2**63) - 1}, "input.small", "64-bit"),
    (nested(1_000), "input.next.next.next.next...", f"deeper than {MAX_DEPTH}"),
]


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()


async def test_start_refuses_unstorable_input_naming_the_field_on_every_backend(
    engine: Engine,
) -> None:
    """Each unstorable input is an InvalidInputError naming its path; no run is written."""
    for value, path, problem in BAD_VALUES:
        with pytest.raises(InvalidInputError) as info:
            await engine.start("echo", value)
        assert info.value.errors[0][0].startswith(path), info.value
        assert problem in str(info.value)
    assert await engine.list() == []
    edge = {"deep": nested(MAX_DEPTH - 1), "int": 2**63 - 1, "text": "caf\u00e9 \U0001f600"}
    handle = await engine.start("echo", edge)  # the limits themselves are storable
    assert (await engine.get_run(handle.run_id)).input == edge


async def test_config_and_search_attributes_refuse_unstorable_values_on_every_backend(
    engine: Engine,
) -> None:
    """Config (validated by its model) and search attributes are held to the same rules."""
    with pytest.raises(InvalidConfigError) as config_error:
        await engine.start("echo", {}, config={"echo": {"label": "a\x00"}})
    assert config_error.value.errors[0][0] == "config.echo.label"
    for attributes, path in [
        ({"k": "\x00"}, "search_attributes.k"),
        ({"k": float("nan")}, "search_attributes.k"),
        ({"k": 2**70}, "search_attributes.k"),
        ({"k\udc80": 1}, "search_attributes"),
    ]:
        with pytest.raises(TreadleValidationError) as info:
            await engine.start("echo", {}, search_attributes=attributes)
        assert info.value.errors[0][0] == path
    with pytest.raises(TreadleValidationError, match="idempotency_key"):
        await engine.start("echo", {}, idempotency_key="key\x00")
    assert await engine.list() == []


async def test_signal_and_update_refuse_unstorable_payloads_on_every_backend(
    engine: Engine,
) -> None:
    """A bad signal or update payload (or name) is refused before the inbox sees it; good
    ones at the limits are delivered and come back unchanged."""
    handle = await engine.start("waiter", {})
    before = len(await run_events(engine, handle.run_id))
    for value, path, problem in BAD_VALUES:
        with pytest.raises(InvalidPayloadError) as info:
            await engine.signal(handle.run_id, "go", value)
        assert info.value.errors[0][0].startswith(path.replace("input", "payload", 1))
        assert problem in str(info.value)
    with pytest.raises(InvalidPayloadError, match=r"payload\.q: contains a NUL"):
        await engine.update(handle.run_id, "ask", {"q": "\x00"}, timeout=1)
    with pytest.raises(TreadleValidationError, match="name"):
        await engine.signal(handle.run_id, "go\x00", {})
    assert len(await run_events(engine, handle.run_id)) == before
    assert await engine.kernel.reads.inbox(handle.run_id) == []
    signal = {"deep": nested(MAX_DEPTH - 2), "n": -(2**63), "f": 0.1}  # 128 in the output
    async with worker(engine):
        await engine.signal(handle.run_id, "go", signal)
        assert await engine.update(handle.run_id, "ask", ["\u2028"], timeout=20) == ["\u2028"]
        assert await handle.result(timeout=20) == {"signal": signal, "update": ["\u2028"]}


async def test_an_unstorable_stage_output_fails_the_stage_once_naming_the_field(
    engine: Engine,
) -> None:
    """A pipeline stage returning a NUL character fails at once (no retry: the same value
    would come back), naming the output field, on every backend; nothing of it is stored."""
    async with worker(engine):
        handle = await engine.start("emit", {})
        await until_status(engine, handle.run_id, RunStatus.FAILED)
    run = await engine.get_run(handle.run_id)
    assert CALLS == {"emit": 1}
    (stage,) = run.stages
    assert stage.status is StageStatus.FAILED
    assert stage.attempt == 1
    assert stage.output is None
    assert "OutputValidationError" in (stage.error or "")
    assert "output.text: contains a NUL character" in (run.error or "")


async def test_an_unstorable_step_result_fails_the_step_under_its_policy(
    engine: Engine,
) -> None:
    """Issue 10 item 6: a code-workflow step returning a NUL string fails as a step failure
    (not as a storage crash retried ten times): once, naming the field, and the run FAILS."""
    async with worker(engine):
        handle = await engine.start("stepper", {})
        await until_status(engine, handle.run_id, RunStatus.FAILED)
    run = await engine.get_run(handle.run_id)
    assert CALLS == {"nul_result": 1}
    assert "StepFailedError" in (run.error or "")
    assert "result: contains a NUL character" in (run.error or "")
    (entry,) = await engine.journal(handle.run_id)
    assert (entry.name, entry.status.value, entry.attempts, entry.result) == (
        "nul",
        "FAILED",
        1,
        None,
    )
    failed = [e for e in await run_events(engine, handle.run_id) if e.type == "step:failed"]  # type: ignore[attr-defined]
    assert [e.will_retry for e in failed] == [False]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "cap", [float("nan"), float("inf"), 1e15, timedelta.max, timedelta(days=4000)]
)
async def test_an_out_of_range_execution_timeout_is_refused_at_start(
    engine: Engine, cap: Any
) -> None:
    """NaN, infinity, 1e15 s and timedelta.max: a TreadleValidationError naming
    execution_timeout (not ValueError or OverflowError), and no run."""
    with pytest.raises(TreadleValidationError) as info:
        await engine.start("stepper", {}, execution_timeout=cap)
    assert info.value.errors[0][0] == "execution_timeout"
    assert await engine.list() == []
