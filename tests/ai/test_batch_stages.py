"""Provider batch APIs as batch stages (``treadle.ai.batches.define_ai_batch_stage``):
the stage submits the prompts through the provider's SDK, suspends with the batch id,
polls ``NotReady`` while the batch runs, then ``Ready`` with the answers in prompt order,
priced at the batch rate. OpenAI Batch and Anthropic Message Batches, against fake
endpoints with the shapes of their public API references (``providers.py``); on memory
(``TestEngine`` and ``advance_time``) and on SQLite and PostgreSQL (an ``Engine`` on the
database, the clock moved by hand, ``stage.pollSuspended`` dispatched)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import Engine, RunStatus, WorkflowBuilder
from treadle.ai.batches import AIBatchOutput, batch_price, define_ai_batch_stage
from treadle.kernel import commands as c
from treadle.kernel.ai import AICall
from treadle.kernel.errors import DefinitionError
from treadle.kernel.model import StageStatus
from treadle.testing import FakeClock, TestEngine
from treadle.testing.databases import sqlite_database
from treadle.tests.ai.providers import INPUT_TOKENS, OUTPUT_TOKENS, FakeAnthropic, FakeOpenAI

POLL = timedelta(minutes=10)


class Docs(BaseModel):
    docs: list[str]


def _workflow(fake: Any, model: str) -> Any:
    stage = define_ai_batch_stage(
        id="summaries",
        input=Docs,
        model=model,
        prompts=lambda ctx: [f"summarise {d}" for d in ctx.input.docs],
        system="Be brief.",
        client=fake.client,
        poll_interval=POLL,
        max_wait=timedelta(hours=24),
    )
    return WorkflowBuilder("summarise", input=Docs).pipe(stage).build()


PROVIDERS = [
    pytest.param(FakeOpenAI, "openai:gpt-4o-mini", id="openai"),
    pytest.param(FakeAnthropic, "anthropic:claude-haiku-4-5", id="anthropic"),
]
DOCS = {"docs": ["alpha", "beta", "gamma"]}


def _check_calls(calls: list[AICall], model: str) -> None:
    """One batch-item AI call per prompt, with its prompt, tokens and batch-price cost."""
    provider, _, name = model.partition(":")
    each = batch_price(provider, name, INPUT_TOKENS, OUTPUT_TOKENS)
    assert [(a.call_type, a.provider, a.model, a.cost) for a in calls] == [
        ("batch-item", provider, name, each)
    ] * 3
    assert [a.prompt for a in calls] == [
        {"prompt": f"summarise {d}", "system": "Be brief."} for d in DOCS["docs"]
    ]
    assert [(a.input_tokens, a.output_tokens, a.stage_id) for a in calls] == [
        (INPUT_TOKENS, OUTPUT_TOKENS, "summaries")
    ] * 3
    assert all(a.response is not None for a in calls)


def _check_output(output: Any, model: str) -> None:
    provider, _, name = model.partition(":")
    out = AIBatchOutput.model_validate(output)
    assert [i.index for i in out.items] == [0, 1, 2]
    assert out.texts == [f"answer to: summarise {d}" for d in DOCS["docs"]]
    each = batch_price(provider, name, INPUT_TOKENS, OUTPUT_TOKENS)
    assert each is not None
    assert [i.cost for i in out.items] == [each] * 3
    assert out.total_cost == each * 3


@pytest.mark.parametrize(("fake_type", "model"), PROVIDERS)
async def test_batch_stage_suspends_polls_not_ready_then_ready_in_memory(
    fake_type: type[Any], model: str
) -> None:
    """Memory (TestEngine): submitted once, SUSPENDED holding no job; the first poll finds
    the batch running (NotReady), the second reads the results, in prompt order."""
    fake = fake_type(polls_until_done=1)
    te = TestEngine([_workflow(fake, model)])
    handle = await te.start("summarise", DOCS)
    await te.run_until_idle()
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.SUSPENDED
    assert fake.batches_created == 1
    assert run.stages[0].status is StageStatus.SUSPENDED

    await te.advance_time(POLL)
    assert (fake.retrievals, (await te.get_run(handle.run_id)).status) == (
        1,
        RunStatus.SUSPENDED,
    )
    await te.advance_time(POLL)
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.COMPLETED, run.error
    assert fake.batches_created == 1  # (the Anthropic SDK retrieves again to read results)
    _check_output(run.output, model)
    async with te.persistence.transaction() as tx:
        _check_calls(await tx.ai_calls.for_run(handle.run_id), model)
        totals = (await tx.ai_calls.totals([handle.run_id]))[handle.run_id]
    assert totals.total_cost == AIBatchOutput.model_validate(run.output).total_cost


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_database(tmp_path)
    return str(request.getfixturevalue("treadle_postgres_url"))


async def _execute_one(engine: Engine, clock: FakeClock) -> Any:
    kernel = engine.kernel
    await kernel.dispatch(c.RunClaimPending(worker_id="w1"))
    (job,) = await kernel.deps.job_transport.dequeue("w1", clock.now())
    return await kernel.dispatch(c.JobExecute(job_id=job.id, worker_id="w1"))


@pytest.mark.parametrize(("fake_type", "model"), PROVIDERS)
async def test_batch_stage_suspends_polls_not_ready_then_ready_on_sql(
    fake_type: type[Any], model: str, sql_url: str, fake_clock: FakeClock
) -> None:
    """SQLite and PostgreSQL: the suspension (batch id in its state) is stored; a poll
    before the batch ended leaves the stage suspended, the next completes the run."""
    fake = fake_type(polls_until_done=1)
    wf = _workflow(fake, model)
    async with await Engine.open(sql_url, workflows=[wf], clock=fake_clock) as engine:
        handle = await engine.start("summarise", DOCS)
        result = await _execute_one(engine, fake_clock)
        assert result.outcome == "suspended"
        run = await engine.get_run(handle.run_id)
        assert run.status is RunStatus.SUSPENDED
        assert fake.batches_created == 1

        fake_clock.advance(POLL)
        polled = await engine.kernel.dispatch(c.StagePollSuspended())
        assert (polled.checked, polled.resumed) == (1, 0)  # NotReady
        assert (await engine.get_run(handle.run_id)).status is RunStatus.SUSPENDED

        fake_clock.advance(POLL)
        polled = await engine.kernel.dispatch(c.StagePollSuspended())
        assert (polled.checked, polled.resumed) == (1, 1)
        for run_id in polled.resumed_workflow_run_ids:
            await engine.kernel.dispatch(c.RunTransition(workflow_run_id=run_id))
        run = await engine.get_run(handle.run_id)
        assert run.status is RunStatus.COMPLETED, run.error
        _check_output(run.output, model)
        assert fake.batches_created == 1
        async with engine.kernel.deps.persistence.transaction() as tx:
            _check_calls(await tx.ai_calls.for_run(handle.run_id), model)
            totals = (await tx.ai_calls.totals([handle.run_id]))[handle.run_id]
        assert totals.total_cost == AIBatchOutput.model_validate(run.output).total_cost


async def test_items_come_back_in_prompt_order_and_a_failed_item_keeps_its_place() -> None:
    """Results arrive out of order; each lands at its prompt's index, and an errored item
    has its error, no text, and costs nothing."""
    fake = FakeAnthropic(polls_until_done=0, fail_index=1)
    te = TestEngine([_workflow(fake, "anthropic:claude-haiku-4-5")])
    handle = await te.start("summarise", DOCS)
    await te.advance_time(POLL)
    run = await te.get_run(handle.run_id)
    out = AIBatchOutput.model_validate(run.output)
    assert out.texts == ["answer to: summarise alpha", None, "answer to: summarise gamma"]
    assert "invalid_request_error" in str(out.items[1].error)
    assert out.items[1].cost == Decimal(0)


async def test_a_batch_the_provider_failed_fails_the_stage() -> None:
    """An OpenAI batch that ends ``failed`` (or expired, cancelled) fails the stage with
    the provider's status in the error."""
    fake = FakeOpenAI(polls_until_done=0, final_status="failed")
    te = TestEngine([_workflow(fake, "openai:gpt-4o-mini")])
    handle = await te.start("summarise", DOCS)
    await te.advance_time(POLL)
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert "ended failed" in str(run.error)


async def test_a_retried_submission_polls_the_batch_already_submitted() -> None:
    """An attempt that dies after the provider accepted the batch (before the suspension
    committed) is retried; the retry finds the batch id the first attempt stored and
    polls that batch: the prompts are submitted once."""
    from treadle.testing import SimulatedCrash

    fake = FakeOpenAI(polls_until_done=0)
    wf = _workflow(fake, "openai:gpt-4o-mini")
    stage = wf.stages["summaries"]
    inner = stage.fn
    crashed: list[bool] = []

    async def dies_after_submitting(ctx: Any) -> Any:
        suspended = await inner(ctx)
        if not crashed:
            crashed.append(True)
            raise SimulatedCrash
        return suspended

    te = TestEngine([wf])
    te.mock_stage("summaries", dies_after_submitting)
    handle = await te.start("summarise", DOCS)
    with pytest.raises(SimulatedCrash):
        await te.run_until_idle()
    assert fake.batches_created == 1
    await te.advance_time(timedelta(minutes=5))  # the lease is reaped, the stage retried
    await te.advance_time(POLL)
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.COMPLETED, run.error
    assert fake.batches_created == 1
    _check_output(run.output, "openai:gpt-4o-mini")


async def test_a_rate_limited_submission_waits_for_the_providers_retry_after() -> None:
    """The provider answers the upload 429 with Retry-After: 300; the stage's next attempt
    waits those five minutes (not the policy's first backoff), then submits."""
    fake = FakeOpenAI(polls_until_done=0, busy_uploads=1)
    te = TestEngine([_workflow(fake, "openai:gpt-4o-mini")])
    handle = await te.start("summarise", DOCS)
    await te.advance_time(timedelta(minutes=4))
    assert (fake.batches_created, fake.requests) == (0, [("POST", "/v1/files")])
    await te.advance_time(timedelta(minutes=2))
    assert fake.batches_created == 1
    await te.advance_time(POLL)
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.COMPLETED, run.error


async def test_prompts_may_be_async_and_carry_their_own_system_prompt() -> None:
    """``prompts`` may be a coroutine function; an ``AIBatchPrompt`` keeps its own system
    prompt, a plain string gets the stage's."""
    from treadle.ai import AIBatchPrompt

    async def prompts(ctx: Any) -> list[Any]:
        return [AIBatchPrompt(prompt="first", system="Be formal."), "second"]

    fake = FakeAnthropic(polls_until_done=0)
    stage = define_ai_batch_stage(
        id="two",
        input=Docs,
        model="anthropic:claude-haiku-4-5",
        prompts=prompts,
        system="Be brief.",
        client=fake.client,
    )
    te = TestEngine([WorkflowBuilder("two-wf", input=Docs).pipe(stage).build()])
    handle = await te.start("two-wf", DOCS)
    await te.advance_time(timedelta(minutes=5))
    assert (await te.get_run(handle.run_id)).status is RunStatus.COMPLETED
    assert [r["params"]["system"] for r in fake.submitted] == ["Be formal.", "Be brief."]


async def test_an_expired_batch_completes_with_the_prompts_it_reached() -> None:
    """An OpenAI batch that expired after answering two of three prompts completes the
    stage: the third item has no text and the error "no result"; the two answered items
    are the run's AI calls and cost."""
    fake = FakeOpenAI(polls_until_done=0, final_status="expired", answered=2)
    te = TestEngine([_workflow(fake, "openai:gpt-4o-mini")])
    handle = await te.start("summarise", DOCS)
    await te.advance_time(POLL)
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.COMPLETED, run.error
    out = AIBatchOutput.model_validate(run.output)
    assert out.texts == ["answer to: summarise alpha", "answer to: summarise beta", None]
    assert out.items[2].error == "no result"
    async with te.persistence.transaction() as tx:
        calls = await tx.ai_calls.for_run(handle.run_id)
    assert len(calls) == 2
    assert (
        run.total_cost == out.total_cost == sum((a.cost or Decimal(0) for a in calls), Decimal(0))
    )


async def test_a_cancelled_batch_fails_the_stage_but_its_answered_prompts_are_costed() -> None:
    """A batch cancelled after answering one prompt fails the stage; that prompt was paid
    for, so it is recorded as an AI call and counted in the run's cost."""
    fake = FakeOpenAI(polls_until_done=0, final_status="cancelled", answered=1)
    te = TestEngine([_workflow(fake, "openai:gpt-4o-mini")])
    handle = await te.start("summarise", DOCS)
    await te.advance_time(POLL)
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert "ended cancelled" in str(run.error)
    async with te.persistence.transaction() as tx:
        calls = await tx.ai_calls.for_run(handle.run_id)
    assert [a.prompt["prompt"] for a in calls] == ["summarise alpha"]  # type: ignore[index]
    assert run.total_cost == calls[0].cost


async def test_more_prompts_than_one_batch_takes_fail_the_stage_before_submitting() -> None:
    """Past the provider's limit (50,000 requests for OpenAI) the stage fails without a
    retry, naming the limit, and nothing is uploaded."""
    fake = FakeOpenAI()
    stage = define_ai_batch_stage(
        id="huge",
        input=Docs,
        model="openai:gpt-4o-mini",
        prompts=lambda ctx: ["x"] * 50_001,
        client=fake.client,
    )
    te = TestEngine([WorkflowBuilder("huge-wf", input=Docs).pipe(stage).build()])
    handle = await te.start("huge-wf", DOCS)
    await te.run_until_idle()
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert "at most 50000" in str(run.error)
    assert fake.requests == []


def test_batch_price_is_half_the_standard_price() -> None:
    """genai-prices' batch variant: 50% of the standard rate for OpenAI and Anthropic."""
    from genai_prices import Usage, calc_price

    for provider, name in (("openai", "gpt-4o-mini"), ("anthropic", "claude-haiku-4-5")):
        standard = calc_price(
            Usage(input_tokens=1000, output_tokens=500), name, provider_id=provider
        )
        assert batch_price(provider, name, 1000, 500) == Decimal(str(standard.total_price)) / 2


def test_a_model_without_a_known_provider_is_refused_at_definition() -> None:
    """The model names its provider (openai: or anthropic:), checked when defined."""
    with pytest.raises(DefinitionError, match="model must be"):
        define_ai_batch_stage(id="x", input=Docs, model="gpt-4o", prompts=lambda ctx: [])
