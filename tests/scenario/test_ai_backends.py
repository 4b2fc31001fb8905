"""AI calls and costs end to end through ``Engine.open`` on memory, a SQLite file and
PostgreSQL: exact totals across a retry and a crash (the crashed attempt's call lost
with it, completed calls never repeated), a budget stop, and the readers
(``Engine.ai_calls``, ``get_run``, ``list``, ``ai_costs``). Models are pydantic-ai
``FunctionModel``s priced as gpt-4o-mini by genai-prices; no network."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from pydantic import BaseModel
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from treadle import (
    Engine,
    RetryPolicy,
    RunFailedError,
    RunStatus,
    WorkflowBuilder,
    WorkflowContext,
    define_stage,
    workflow,
)
from treadle.kernel import commands as c
from treadle.testing import FakeClock, SimulatedCrash
from treadle.tests.scenario.helpers import WAIT, worker

PROMPTS: list[str] = []
"""Every prompt the model received, in order (a crashed or failed request included)."""


def _answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    prompt = str(messages[-1].parts[-1].content)  # type: ignore[union-attr]
    PROMPTS.append(prompt)
    if prompt == "flaky" and PROMPTS.count("flaky") == 1:
        raise ModelHTTPError(429, "gpt-4o-mini", "rate limited")
    if prompt == "crash" and PROMPTS.count("crash") == 1:
        raise SimulatedCrash  # the worker dies while the request is in flight
    return ModelResponse(parts=[TextPart(f"answer to {prompt}")])


MODEL = FunctionModel(_answer, model_name="gpt-4o-mini")
NOW = RetryPolicy(max_attempts=3, initial_delay=0)


class Doc(BaseModel):
    text: str


@workflow(id="ai-steps", input=Doc, output=list[str])
async def ai_steps(ctx: WorkflowContext, doc: Doc) -> list[str]:
    one = await ctx.ai.generate_text(MODEL, "one")
    flaky = await ctx.ai.generate_text(MODEL, "flaky", retry=NOW)
    crash = await ctx.ai.generate_text(MODEL, "crash")
    return [one.output, flaky.output, crash.output]


@define_stage(id="ask", input=Doc, output=Doc, retry=NOW)
async def ask(ctx):  # type: ignore[no-untyped-def]
    first = await ctx.ai.generate_text(MODEL, "flaky", topic="ask")
    await ctx.ai.generate_text(MODEL, "again", topic="ask")
    return Doc(text=first.output)


ai_pipe = WorkflowBuilder("ai-pipe", input=Doc).pipe(ask).build()


@define_stage(id="spend", input=Doc, output=Doc)
async def spend(ctx):  # type: ignore[no-untyped-def]
    await ctx.ai.generate_text(MODEL, "first")
    await ctx.ai.generate_text(MODEL, "second")
    return ctx.input


budgeted = WorkflowBuilder("budgeted", input=Doc, max_cost="0.000001").pipe(spend).build()

WORKFLOWS = [ai_steps, ai_pipe, budgeted]


@pytest.fixture(autouse=True)
def _reset() -> None:
    PROMPTS.clear()


async def test_totals_are_exact_across_a_retry_and_a_crash(
    engine: Engine, clock: FakeClock
) -> None:
    """A 429 retried in the step and a worker crash during a later request: the finished
    calls are not made again, the failed attempt is recorded and marked, the crashed
    request is lost with its attempt, and the run's totals are the exact sums."""
    kernel = engine.kernel
    handle = await engine.start("ai-steps", {"text": "x"})
    await kernel.dispatch(c.RunClaimPending(worker_id="w1"))
    (job,) = await kernel.deps.job_transport.dequeue("w1", clock.now())
    with pytest.raises(SimulatedCrash):
        await kernel.dispatch(c.JobExecute(job_id=job.id, worker_id="w1"))
    clock.advance(timedelta(minutes=5))
    reaped = await kernel.dispatch(c.LeaseReapStale(stale_threshold=timedelta(seconds=60)))
    assert reaped.released == 1
    clock.advance(timedelta(minutes=5))  # past the release backoff
    (again,) = await kernel.deps.job_transport.dequeue("w2", clock.now())
    result = await kernel.dispatch(c.JobExecute(job_id=again.id, worker_id="w2"))
    assert result.output == ["answer to one", "answer to flaky", "answer to crash"]
    assert PROMPTS == ["one", "flaky", "flaky", "crash", "crash"]

    calls = await engine.ai_calls(handle.run_id)
    assert [(c_.step, c_.attempt, c_.failed_attempt) for c_ in calls] == [
        ("ai.generate_text#1", 1, False),
        ("ai.generate_text#2", 1, True),
        ("ai.generate_text#2", 2, False),
        ("ai.generate_text#3", 1, False),
    ]
    assert calls[1].error is not None
    assert "AIRateLimitedError" in calls[1].error
    assert all(c_.cost and c_.cost > 0 for c_ in (calls[0], calls[2], calls[3]))
    run = await engine.get_run(handle.run_id)
    assert run.status is RunStatus.COMPLETED
    assert run.total_cost == sum((c_.cost or Decimal(0) for c_ in calls), Decimal(0))
    assert run.total_tokens == sum(c_.total_tokens for c_ in calls)


async def test_stage_retry_totals_and_readers(engine: Engine) -> None:
    """A stage whose first attempt hits a 429 is retried; both attempts' calls are kept
    (the first marked), and get_run, list and ai_costs report the same totals."""
    async with worker(engine):
        handle = await engine.start("ai-pipe", {"text": "x"})
        assert await handle.result(timeout=WAIT) == {"text": "answer to flaky"}
    assert PROMPTS == ["flaky", "flaky", "again"]
    calls = await engine.ai_calls(handle.run_id)
    assert [(c_.stage_id, c_.attempt, c_.failed_attempt, c_.topic) for c_ in calls] == [
        ("ask", 1, True, "ask"),
        ("ask", 2, False, "ask"),
        ("ask", 2, False, "ask"),
    ]
    total = sum((c_.cost or Decimal(0) for c_ in calls), Decimal(0))
    run = await engine.get_run(handle.run_id)
    assert run.total_cost == total
    assert total > 0
    [listed] = await engine.list(workflow_id="ai-pipe")
    assert (listed.total_cost, listed.total_tokens) == (run.total_cost, run.total_tokens)
    [by_model] = await engine.ai_costs("model")
    assert (by_model.key, by_model.calls, by_model.failed_calls) == ("gpt-4o-mini", 3, 1)
    assert by_model.total_cost == total
    [by_workflow] = await engine.ai_costs("workflow", since=timedelta(days=7))
    assert (by_workflow.key, by_workflow.total_cost) == ("ai-pipe", total)


async def test_budget_stops_the_run_before_the_next_call(engine: Engine) -> None:
    """The workflow's max_cost is reached by the first call: the second is never made,
    and the run fails with BudgetExceededError, its spend recorded."""
    async with worker(engine):
        handle = await engine.start("budgeted", {"text": "x"})
        with pytest.raises(RunFailedError, match="BudgetExceededError"):
            await handle.result(timeout=WAIT)
    assert PROMPTS == ["first"]
    run = await engine.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert run.max_cost == Decimal("0.000001")
    assert run.total_cost >= run.max_cost
    [call] = await engine.ai_calls(handle.run_id)
    assert call.failed_attempt
