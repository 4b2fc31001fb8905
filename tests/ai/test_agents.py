"""Durable pydantic-ai agents (``treadle.ai.agents``) on memory, SQLite and PostgreSQL:
each model request and tool call is a journaled step, so an agent run that dies between
two tool calls resumes without asking the model again, and a tool can wait durably for a
signal or a person. The model is pydantic-ai's ``FunctionModel`` (no network); it counts
its invocations."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from treadle import Engine, RunStatus, WorkflowContext, workflow
from treadle.ai.agents import TreadleAgent, current_workflow
from treadle.kernel import commands as c
from treadle.kernel.ai import AICall, AITotals
from treadle.testing import FakeClock, SimulatedCrash
from treadle.testing.databases import sqlite_database
from treadle.tests.scenario.helpers import WAIT, until_status, worker

MODEL_CALLS: list[int] = []
"""One entry per invocation of the model function (the number of messages it was sent)."""
TOOL_RUNS: list[str] = []
CRASH_ON: set[str] = set()
"""Tools that raise ``SimulatedCrash`` on their next run (as a SIGKILL would stop them)."""


def _plan(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """lookup -> charge -> (ask_human | ask_reviewer, if the agent has it) -> answer."""
    MODEL_CALLS.append(len(messages))
    returns = [p for p in messages[-1].parts if isinstance(p, ToolReturnPart)]
    tools = {t.name for t in info.function_tools}
    if not returns:
        return ModelResponse(parts=[ToolCallPart("lookup", {"sku": "A-1"})])
    done = returns[0]
    if done.tool_name == "lookup":
        return ModelResponse(parts=[ToolCallPart("charge", {"amount": done.content})])
    waiting = tools & {"ask_human", "ask_reviewer"}
    if done.tool_name == "charge" and waiting:
        return ModelResponse(parts=[ToolCallPart(waiting.pop(), {"question": "ship it?"})])
    return ModelResponse(parts=[TextPart(f"done: {done.content}")])


def _agent(name: str) -> Agent[None, str]:
    agent: Agent[None, str] = Agent(FunctionModel(_plan, model_name="gpt-4o-mini"), name=name)

    @agent.tool_plain
    def lookup(sku: str) -> int:
        TOOL_RUNS.append("lookup")
        return 42

    @agent.tool_plain
    def charge(amount: int) -> str:
        TOOL_RUNS.append("charge")
        if "charge" in CRASH_ON:
            CRASH_ON.discard("charge")
            raise SimulatedCrash
        return f"charged {amount}"

    return agent


shop = _agent("shop")

signalled = _agent("signalled")


@signalled.tool_plain(durable=False)
async def ask_human(question: str) -> str:
    """Runs in the workflow body (not a step): its wait is the durable boundary."""
    answer: str = await current_workflow().wait_for_signal("answer", str)
    return answer


reviewed = _agent("reviewed")


@reviewed.tool_plain(durable=False)
async def ask_reviewer(question: str) -> str:
    decision = await current_workflow().review({"question": question}, reviewers=["ops"])
    return f"{decision.decision} by {decision.reviewer}"


class Ask(BaseModel):
    prompt: str


@workflow(id="shop-agent", input=Ask, output=str)
async def shop_agent(ctx: WorkflowContext, ask: Ask) -> str:
    result = await TreadleAgent(shop).run(ctx, ask.prompt)
    return str(result.output)


@workflow(id="signal-agent", input=Ask, output=str)
async def signal_agent(ctx: WorkflowContext, ask: Ask) -> str:
    result = await TreadleAgent(signalled).run(ctx, ask.prompt)
    return str(result.output)


@workflow(id="review-agent", input=Ask, output=str)
async def review_agent(ctx: WorkflowContext, ask: Ask) -> str:
    result = await TreadleAgent(reviewed).run(ctx, ask.prompt)
    return str(result.output)


WORKFLOWS = [shop_agent, signal_agent, review_agent]

misdeclared = _agent("misdeclared")


@misdeclared.tool_plain(name="ask_human")  # durable: inside a step, no ctx call allowed
async def ask_human_in_a_step(question: str) -> str:
    answer: str = await current_workflow().wait_for_signal("answer", str)
    return answer


@workflow(id="misdeclared-agent", input=Ask, output=str)
async def misdeclared_agent(ctx: WorkflowContext, ask: Ask) -> str:
    result = await TreadleAgent(misdeclared).run(ctx, ask.prompt)
    return str(result.output)


BUSY: list[float] = []
"""Retry-After seconds of the 429s the rate-limited model answers before it works."""


def _busy_plan(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    from pydantic_ai.exceptions import ModelHTTPError

    MODEL_CALLS.append(len(messages))
    if BUSY:
        raise ModelHTTPError(429, "gpt-4o-mini", {"error": "rate limited"}, retry_after=BUSY.pop())
    return ModelResponse(parts=[TextPart("served")])


busy = Agent(FunctionModel(_busy_plan, model_name="gpt-4o-mini"), name="busy")


@workflow(id="busy-agent", input=Ask, output=str)
async def busy_agent(ctx: WorkflowContext, ask: Ask) -> str:
    result = await TreadleAgent(busy).run(ctx, ask.prompt)
    return str(result.output)


@pytest.fixture(autouse=True)
def _reset() -> None:
    MODEL_CALLS.clear()
    TOOL_RUNS.clear()
    CRASH_ON.clear()
    BUSY.clear()


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return sqlite_database(tmp_path)
    return str(request.getfixturevalue("treadle_postgres_url"))


@pytest.fixture
async def engine(url: str, fake_clock: FakeClock) -> AsyncIterator[Engine]:
    async with await Engine.open(url, workflows=WORKFLOWS, clock=fake_clock) as opened:
        yield opened


async def _ai_calls(engine: Engine, run_id: str) -> list[AICall]:
    async with engine.kernel.deps.persistence.transaction() as tx:
        return await tx.ai_calls.for_run(run_id)


async def _ai_totals(engine: Engine, run_id: str) -> AITotals:
    async with engine.kernel.deps.persistence.transaction() as tx:
        return (await tx.ai_calls.totals([run_id]))[run_id]


async def _steps(engine: Engine, run_id: str) -> list[tuple[str, int, int]]:
    return [(e.name, e.occurrence, e.attempts) for e in await engine.journal(run_id)]


async def test_agent_resumes_after_a_crash_between_tool_calls_without_asking_the_model_again(
    engine: Engine, url: str, fake_clock: FakeClock
) -> None:
    """The worker dies while the second tool runs (after the first tool and two model
    requests committed): once its lease is reaped, another execution (a fresh engine on
    the same database, for SQLite and PostgreSQL) finishes the agent run; the model is
    called three times in all, the first tool once."""
    kernel = engine.kernel
    handle = await engine.start("shop-agent", {"prompt": "buy A-1"})
    CRASH_ON.add("charge")
    await kernel.dispatch(c.RunClaimPending(worker_id="w1"))
    (job,) = await kernel.deps.job_transport.dequeue("w1", fake_clock.now())
    with pytest.raises(SimulatedCrash):
        await kernel.dispatch(c.JobExecute(job_id=job.id, worker_id="w1"))
    assert await _steps(engine, handle.run_id) == [
        ("shop__model.request", 1, 1),
        ("shop__function_toolset__<agent>.call_tool:lookup", 1, 1),
        ("shop__model.request", 2, 1),
    ]
    assert (len(MODEL_CALLS), TOOL_RUNS) == (2, ["lookup", "charge"])

    fake_clock.advance(timedelta(minutes=5))
    resumer = engine
    if url != "memory://":  # the dead worker's engine is gone; another process resumes
        await engine.aclose()
        resumer = await Engine.open(url, workflows=WORKFLOWS, clock=fake_clock)
    try:
        kernel = resumer.kernel
        reaped = await kernel.dispatch(c.LeaseReapStale(stale_threshold=timedelta(seconds=60)))
        assert reaped.released == 1
        fake_clock.advance(timedelta(minutes=5))  # past the release backoff
        (again,) = await kernel.deps.job_transport.dequeue("w2", fake_clock.now())
        result = await kernel.dispatch(c.JobExecute(job_id=again.id, worker_id="w2"))
        assert result.outcome == "completed"
        assert result.output == "done: charged 42"
        assert len(MODEL_CALLS) == 3  # requests 1 and 2 came from the journal
        assert TOOL_RUNS == ["lookup", "charge", "charge"]  # the step in flight ran again
        assert await _steps(resumer, handle.run_id) == [
            ("shop__model.request", 1, 1),
            ("shop__function_toolset__<agent>.call_tool:lookup", 1, 1),
            ("shop__model.request", 2, 1),
            ("shop__function_toolset__<agent>.call_tool:charge", 1, 1),
            ("shop__model.request", 3, 1),
        ]
        assert (await resumer.get_run(handle.run_id)).status is RunStatus.COMPLETED
        # every model request recorded once, with the step that made it: the two the
        # dead worker made committed with their steps, the replay recorded nothing again
        calls = await _ai_calls(resumer, handle.run_id)
        assert [(a.call_type, a.step, a.model) for a in calls] == [
            ("agent-request", "shop__model.request#1", "gpt-4o-mini"),
            ("agent-request", "shop__model.request#2", "gpt-4o-mini"),
            ("agent-request", "shop__model.request#3", "gpt-4o-mini"),
        ]
        assert all(a.cost is not None and a.cost > 0 for a in calls)
        assert all(a.input_tokens > 0 and a.output_tokens > 0 for a in calls)
        totals = await _ai_totals(resumer, handle.run_id)
        assert totals.calls == 3
        assert totals.total_cost == sum((a.cost or Decimal(0) for a in calls), Decimal(0))
        assert totals.total_tokens == sum(a.input_tokens + a.output_tokens for a in calls)
    finally:
        if resumer is not engine:
            await resumer.aclose()


async def test_a_tool_waits_durably_for_a_signal(engine: Engine) -> None:
    """A tool declared durable=False waits for a signal: the run suspends holding no
    worker; the signal resumes it, and no earlier model request or tool call is made
    again (a replay takes them from the journal)."""
    async with worker(engine, concurrency=2):
        handle = await engine.start("signal-agent", {"prompt": "buy A-1"})
        await until_status(engine, handle.run_id, RunStatus.SUSPENDED)
        assert (len(MODEL_CALLS), TOOL_RUNS) == (3, ["lookup", "charge"])
        await engine.signal(handle.run_id, "answer", "yes, ship it")
        assert await handle.result(timeout=WAIT) == "done: yes, ship it"
    assert len(MODEL_CALLS) == 4
    assert TOOL_RUNS == ["lookup", "charge"]


async def test_a_tool_waits_durably_for_a_human_review(engine: Engine) -> None:
    """A tool asks for a review (ctx.review): the run suspends with review:requested;
    engine.decide_review resumes it with the reviewer's decision."""
    async with worker(engine, concurrency=2):
        handle = await engine.start("review-agent", {"prompt": "buy A-1"})
        await until_status(engine, handle.run_id, RunStatus.SUSPENDED)
        requested: list[Any] = [
            e
            async for e in engine.events(handle.run_id)
            if e.type == "review:requested"  # type: ignore[attr-defined]
        ]
        assert requested[0].reviewers == ["ops"]
        await engine.decide_review(
            handle.run_id, requested[0].review_id, "approved", reviewer="ana"
        )
        assert await handle.result(timeout=WAIT) == "done: approved by ana"
    assert len(MODEL_CALLS) == 4
    assert TOOL_RUNS == ["lookup", "charge"]


def _flaky_plan(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    MODEL_CALLS.append(len(messages))
    if len(MODEL_CALLS) < 3:
        raise ConnectionError("provider unreachable")
    return ModelResponse(parts=[TextPart("recovered")])


def _broken_plan(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    MODEL_CALLS.append(len(messages))
    raise ConnectionError("provider unreachable")


flaky = Agent(FunctionModel(_flaky_plan), name="flaky")
broken = Agent(FunctionModel(_broken_plan), name="broken")


@workflow(id="flaky-agent", input=Ask, output=str)
async def flaky_agent(ctx: WorkflowContext, ask: Ask) -> str:
    result = await TreadleAgent(flaky).run(ctx, ask.prompt)
    return str(result.output)


@workflow(id="broken-agent", input=Ask, output=str)
async def broken_agent(ctx: WorkflowContext, ask: Ask) -> str:
    result = await TreadleAgent(broken).run(ctx, ask.prompt)
    return str(result.output)


async def test_a_failing_model_request_retries_durably_then_fails_the_run() -> None:
    """A model request that raises is a step attempt that failed: it retries after a
    durable backoff (the virtual clock must pass it), and once the step's policy is
    exhausted the run fails naming the step."""
    from treadle.testing import TestEngine

    te = TestEngine([flaky_agent, broken_agent])
    handle = await te.start("flaky-agent", {"prompt": "hi"})
    await te.run_until_idle()
    assert len(MODEL_CALLS) == 1  # the second attempt waits for its backoff
    await te.advance_time(timedelta(minutes=1))
    assert await handle.result() == "recovered"
    assert len(MODEL_CALLS) == 3

    MODEL_CALLS.clear()
    handle = await te.start("broken-agent", {"prompt": "hi"})
    await te.advance_time(timedelta(minutes=1))
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert "broken__model.request" in str(run.error)
    assert "provider unreachable" in str(run.error)
    assert len(MODEL_CALLS) == 3
    async with te.persistence.transaction() as tx:
        calls = await tx.ai_calls.for_run(handle.run_id)
    # each failed request is an AI call of a failed attempt, with its error, costing nothing
    assert [(a.attempt, a.failed_attempt, a.cost) for a in calls] == [
        (1, True, None),
        (2, True, None),
        (3, True, None),
    ]
    assert all("provider unreachable" in str(a.error) for a in calls)


def test_current_workflow_outside_an_agent_run_is_a_named_error() -> None:
    """current_workflow() outside TreadleAgent.run raises AgentOutsideWorkflowError."""
    from treadle import AgentOutsideWorkflowError

    with pytest.raises(AgentOutsideWorkflowError, match=r"TreadleAgent\.run"):
        current_workflow()


async def test_the_durability_capability_passes_through_outside_a_workflow() -> None:
    """The same agent, run with TreadleDurability but outside a workflow, runs as it
    would without Treadle (no step, no error)."""
    from treadle.ai import TreadleDurability

    result = await shop.run("buy A-1", capabilities=[TreadleDurability()])
    assert result.output == "done: charged 42"
    assert len(MODEL_CALLS) == 3


async def test_the_run_budget_stops_the_agent_before_its_next_model_request(
    engine: Engine,
) -> None:
    """With max_cost below what the first model request cost, the second request is not
    made: the run fails with BudgetExceededError, its cost is the first request's."""
    from treadle import RunFailedError

    async with worker(engine, concurrency=2):
        handle = await engine.start("shop-agent", {"prompt": "buy A-1"}, max_cost="0.000001")
        with pytest.raises(RunFailedError, match="BudgetExceededError"):
            await handle.result(timeout=WAIT)
    assert (len(MODEL_CALLS), TOOL_RUNS) == (1, ["lookup"])
    calls = await _ai_calls(engine, handle.run_id)
    assert [a.step for a in calls] == ["shop__model.request#1"]
    totals = await _ai_totals(engine, handle.run_id)
    assert totals.total_cost == calls[0].cost
    assert totals.max_cost == Decimal("0.000001")


async def test_a_rate_limited_model_request_waits_for_the_providers_retry_after() -> None:
    """A 429 with Retry-After: 600 s is an AIRateLimitedError; the step's next attempt
    waits the ten minutes the provider asked (not the policy's 1 s), durably."""
    from treadle.testing import TestEngine

    BUSY.append(600.0)
    te = TestEngine([busy_agent])
    handle = await te.start("busy-agent", {"prompt": "hi"})
    await te.advance_time(timedelta(minutes=9))
    assert len(MODEL_CALLS) == 1
    await te.advance_time(timedelta(minutes=2))
    assert await handle.result() == "served"
    assert len(MODEL_CALLS) == 2
    async with te.persistence.transaction() as tx:
        calls = await tx.ai_calls.for_run(handle.run_id)
    assert [(a.attempt, a.failed_attempt) for a in calls] == [(1, True), (2, False)]
    assert "429" in str(calls[0].error)


async def test_a_waiting_tool_not_declared_durable_false_fails_with_a_clear_error() -> None:
    """A tool that calls current_workflow() from inside its step fails the run with an
    AgentOutsideWorkflowError that says to declare it durable=False (no retry, no
    corrupted journal)."""
    from treadle.testing import TestEngine

    te = TestEngine([misdeclared_agent])
    handle = await te.start("misdeclared-agent", {"prompt": "buy A-1"})
    await te.advance_time(timedelta(minutes=1))
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert "durable=False" in str(run.error)
    assert "AgentOutsideWorkflowError" in str(run.error)


class Verdict(BaseModel):
    approved: bool
    reason: str


def _structured_plan(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    MODEL_CALLS.append(len(messages))
    output_tool = info.output_tools[0].name
    return ModelResponse(
        parts=[ToolCallPart(output_tool, {"approved": True, "reason": "within policy"})]
    )


judge = Agent(
    FunctionModel(_structured_plan, model_name="gpt-4o-mini"), name="judge", output_type=Verdict
)


@workflow(id="judge-then-wait", input=Ask, output=Verdict)
async def judge_then_wait(ctx: WorkflowContext, ask: Ask) -> Verdict:
    verdict: Verdict = (await TreadleAgent(judge).run(ctx, ask.prompt)).output
    await ctx.sleep(timedelta(hours=2))
    return verdict


async def test_structured_output_survives_the_replay_without_a_new_model_request() -> None:
    """An agent with a pydantic output type: after a durable sleep the body replays, the
    agent's request comes from the journal, and the run returns the same typed output."""
    from treadle.testing import TestEngine

    te = TestEngine([judge_then_wait])
    handle = await te.start("judge-then-wait", {"prompt": "refund 20 EUR?"})
    await te.run_until_idle()
    assert len(MODEL_CALLS) == 1
    te.kernel.close()  # drop the parked body (sticky execution): the next activation replays
    await te.advance_time(timedelta(hours=2))
    assert await handle.result() == {"approved": True, "reason": "within policy"}
    assert len(MODEL_CALLS) == 1
