"""``ctx.ai.generate_text`` / ``generate_object`` on pydantic-ai's ``FunctionModel`` (no
network): results with usage and genai-prices costs, calls recorded with the stage or
step, retries after a 429 that honour its retry-after, journaled calls never repeated by
a replay, and budgets that stop a run before the next call."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from treadle import (
    BudgetExceededError,
    RetryPolicy,
    WorkflowBuilder,
    WorkflowContext,
    define_stage,
    workflow,
)
from treadle.kernel.ai import AICall
from treadle.kernel.errors import RunFailedError
from treadle.kernel.events import StageStarted
from treadle.testing import TestEngine


class Doc(BaseModel):
    text: str


class Summary(BaseModel):
    title: str
    words: int


def text_model(calls: list[str], *, fail_first: int = 0, retry_after: float | None = None):  # type: ignore[no-untyped-def]
    """A FunctionModel priced as gpt-4o-mini that answers "summary of <prompt>"."""

    def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls.append("call")
        if len(calls) <= fail_first:
            headers = {"retry-after": str(retry_after)} if retry_after else None
            raise ModelHTTPError(
                429, "gpt-4o-mini", "slow down", headers=headers, retry_after=retry_after
            )
        prompt = str(messages[-1].parts[-1].content)  # type: ignore[union-attr]
        return ModelResponse(parts=[TextPart(f"summary of {prompt}")])

    return FunctionModel(answer, model_name="gpt-4o-mini")


def object_model() -> FunctionModel:
    def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        tool = info.output_tools[0]
        return ModelResponse(parts=[ToolCallPart(tool.name, {"title": "Hello", "words": 2})])

    return FunctionModel(answer, model_name="gpt-4o-mini")


async def _calls(te: TestEngine, run_id: str) -> list[AICall]:
    async with te.persistence.transaction() as tx:
        return await tx.ai_calls.for_run(run_id)


async def test_generate_text_returns_usage_and_cost_and_records_the_call() -> None:
    """A stage's generate_text returns the text with its tokens and genai-prices cost;
    the call is recorded with the same figures, and the run's totals add them up."""
    seen: list[Any] = []
    model = text_model([])

    @define_stage(id="summarise", input=Doc, output=Doc)
    async def summarise(ctx):  # type: ignore[no-untyped-def]
        result = await ctx.ai.generate_text(model, ctx.input.text, topic="summary")
        seen.append(result)
        return Doc(text=result.output)

    te = TestEngine([WorkflowBuilder("wf", input=Doc).pipe(summarise).build()])
    handle = await te.start("wf", {"text": "hello"})
    await te.run_until_idle()
    assert await handle.result() == {"text": "summary of hello"}
    [result] = seen
    assert result.model == "gpt-4o-mini"
    assert result.input_tokens > 0
    assert result.output_tokens > 0
    assert result.cost is not None
    assert result.cost > 0
    [call] = await _calls(te, handle.run_id)
    assert (call.call_type, call.topic, call.model, call.prompt) == (
        "text",
        "summary",
        "gpt-4o-mini",
        "hello",
    )
    assert call.response == "summary of hello"
    assert (call.input_tokens, call.output_tokens, call.cost) == (
        result.input_tokens,
        result.output_tokens,
        result.cost,
    )
    run = await te.get_run(handle.run_id)
    assert run.total_cost == result.cost
    assert run.total_tokens == result.total_tokens


async def test_generate_object_validates_the_schema() -> None:
    """generate_object returns an instance of the schema, recorded as an ``object`` call."""
    model = object_model()

    @define_stage(id="extract", input=Doc, output=Summary)
    async def extract(ctx):  # type: ignore[no-untyped-def]
        result = await ctx.ai.generate_object(model, ctx.input.text, schema=Summary)
        assert isinstance(result.output, Summary)
        return result.output

    te = TestEngine([WorkflowBuilder("wf", input=Doc).pipe(extract).build()])
    handle = await te.start("wf", {"text": "hello world"})
    await te.run_until_idle()
    assert await handle.result() == {"title": "Hello", "words": 2}
    [call] = await _calls(te, handle.run_id)
    assert call.call_type == "object"
    assert call.response == {"title": "Hello", "words": 2}


async def test_rate_limit_retries_after_the_providers_retry_after() -> None:
    """A 429 with retry-after 30 s fails the attempt (the failed call recorded and
    marked) and the next attempt starts 30 s later, not after the policy's 1 s."""
    model_calls: list[str] = []
    model = text_model(model_calls, fail_first=1, retry_after=30)

    @define_stage(
        id="ask", input=Doc, output=Doc, retry=RetryPolicy(max_attempts=3, initial_delay=1.0)
    )
    async def ask(ctx):  # type: ignore[no-untyped-def]
        return Doc(text=(await ctx.ai.generate_text(model, ctx.input.text)).output)

    te = TestEngine([WorkflowBuilder("wf", input=Doc).pipe(ask).build()])
    handle = await te.start("wf", {"text": "x"})
    await te.run_until_idle()
    await te.advance_time(10)
    assert len(model_calls) == 1  # still waiting for the provider's 30 s
    await te.advance_time(30)
    assert await handle.result() == {"text": "summary of x"}
    starts = [e.timestamp for e in te.events if isinstance(e, StageStarted)]
    assert starts[1] - starts[0] >= timedelta(seconds=30)
    failed, ok = await _calls(te, handle.run_id)
    assert failed.failed_attempt
    assert failed.error is not None
    assert "AIRateLimitedError" in failed.error
    assert not ok.failed_attempt


async def test_code_workflow_calls_are_journaled_and_never_repeated() -> None:
    """In a code workflow each generate call is a journaled step: after a sleep the body
    replays, and the model is not called again; each call is recorded once."""
    model_calls: list[str] = []
    model = text_model(model_calls)

    @workflow(id="cw", input=Doc, output=Summary)
    async def cw(ctx: WorkflowContext, doc: Doc) -> Summary:
        first = await ctx.ai.generate_text(model, doc.text)
        await ctx.sleep(timedelta(hours=1))
        second = await ctx.ai.generate_object(object_model(), first.output, schema=Summary)
        return second.output

    te = TestEngine([cw], settings=None)
    handle = await te.start("cw", {"text": "hello"})
    await te.advance_time(timedelta(hours=2))
    assert await handle.result() == {"title": "Hello", "words": 2}
    assert model_calls == ["call"]
    calls = await _calls(te, handle.run_id)
    assert [(c.step, c.call_type) for c in calls] == [
        ("ai.generate_text#1", "text"),
        ("ai.generate_object#1", "object"),
    ]


@pytest.mark.parametrize("sticky", [True, False])
async def test_budget_stops_the_run_before_the_next_call(sticky: bool) -> None:
    """With max_cost reached by the first call, the second call is not made: the run
    fails with BudgetExceededError, in a stage and in a code workflow alike."""
    from treadle.kernel.kernel import KernelSettings

    model_calls: list[str] = []
    model = text_model(model_calls)

    @define_stage(id="ask", input=Doc, output=Doc)
    async def ask(ctx):  # type: ignore[no-untyped-def]
        await ctx.ai.generate_text(model, "one")
        await ctx.ai.generate_text(model, "two")
        return ctx.input

    @workflow(id="cw", input=Doc, output=Doc)
    async def cw(ctx: WorkflowContext, doc: Doc) -> Doc:
        await ctx.ai.generate_text(model, "one")
        await ctx.ai.generate_text(model, "two")
        return doc

    settings = KernelSettings(sticky_execution=sticky)
    te = TestEngine([WorkflowBuilder("wf", input=Doc).pipe(ask).build(), cw], settings=settings)
    for workflow_id in ("wf", "cw"):
        model_calls.clear()
        handle = await te.start(workflow_id, {"text": "x"}, max_cost=Decimal("0.000001"))
        await te.run_until_idle()
        with pytest.raises(RunFailedError, match="BudgetExceededError"):
            await handle.result()
        assert model_calls == ["call"]
        run = await te.get_run(handle.run_id)
        assert run.total_cost >= Decimal("0.000001")
        assert len(await _calls(te, handle.run_id)) == 1


async def test_workflow_budget_applies_unless_the_start_overrides_it() -> None:
    """A workflow's max_cost is every run's budget; a start's max_cost replaces it."""
    model_calls: list[str] = []
    model = text_model(model_calls)

    @define_stage(id="ask", input=Doc, output=Doc)
    async def ask(ctx):  # type: ignore[no-untyped-def]
        await ctx.ai.generate_text(model, "one")
        await ctx.ai.generate_text(model, "two")
        return ctx.input

    wf = WorkflowBuilder("wf", input=Doc, max_cost="0.000001").pipe(ask).build()
    te = TestEngine([wf])
    stopped = await te.start("wf", {"text": "x"})
    allowed = await te.start("wf", {"text": "y"}, max_cost=1)
    await te.run_until_idle()
    with pytest.raises(RunFailedError, match="BudgetExceededError"):
        await stopped.result()
    assert await allowed.result() == {"text": "y"}
    assert model_calls == ["call"] * 3


async def test_budget_error_is_named_by_the_engine() -> None:
    """BudgetExceededError is importable from treadle and never retried."""
    assert BudgetExceededError.retryable is False
    assert RetryPolicy().is_retryable(BudgetExceededError("x")) is False
