"""Data flow through a pipeline: run input to group 0, single-stage outputs, dicts from
parallel groups, require/optional, config defaults, mocks and priority order."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from treadle import StageContext, WorkflowBuilder, define_stage
from treadle.kernel import commands as c
from treadle.kernel.events import WorkflowCompleted
from treadle.kernel.model import RunStatus, StageStatus
from treadle.testing import TestEngine


class UrlIn(BaseModel):
    url: str


class TextOut(BaseModel):
    text: str
    word_count: int


class Score(BaseModel):
    score: float


class Both(BaseModel):
    sentiment: Score
    keywords: Score


class Final(BaseModel):
    summary: str


class ExtractConfig(BaseModel):
    max_length: int = 5
    suffix: str = "!"


SEEN: dict[str, Any] = {}


@define_stage(id="extract", input=UrlIn, output=TextOut, config=ExtractConfig)
async def extract(ctx: StageContext[UrlIn, ExtractConfig]) -> TextOut:
    SEEN["extract"] = (ctx.input, ctx.config)
    text = ("content of " + ctx.input.url)[: ctx.config.max_length] + ctx.config.suffix
    return TextOut(text=text, word_count=len(text.split()))


@define_stage(id="sentiment", input=TextOut, output=Score)
def sentiment(ctx: StageContext[TextOut, None]) -> dict[str, float]:
    SEEN["sentiment"] = ctx.input
    return {"score": ctx.input.word_count / 10}


@define_stage(id="keywords", input=TextOut, output=Score)
async def keywords(ctx: StageContext[TextOut, None]) -> Score:
    SEEN["keywords"] = ctx.input
    return Score(score=len(ctx.input.text))


@define_stage(id="join", input=Both, output=Final)
async def join(ctx: StageContext[Both, None]) -> Final:
    SEEN["join"] = ctx.input
    extracted = ctx.require("extract")
    assert isinstance(extracted, TextOut)
    assert ctx.optional("missing-stage") is None
    return Final(summary=f"{extracted.text}|{ctx.input.sentiment.score}|{ctx.input.keywords.score}")


@define_stage(id="aggregate", input="none", output=Final)
async def aggregate(ctx: StageContext[None, None]) -> Final:
    SEEN["aggregate"] = ctx.input
    return Final(summary=ctx.require("join").summary.upper())


PIPELINE = (
    WorkflowBuilder("doc", input=UrlIn, description="example")
    .pipe(extract)
    .parallel([sentiment, keywords])
    .pipe(join)
    .pipe(aggregate)
    .build()
)


async def test_data_flows_between_single_and_parallel_groups() -> None:
    """Group 0 gets the run input, a parallel group gets the previous stage's output,
    the next group a dict keyed by stage id, and the run's output is the last group's."""
    SEEN.clear()
    te = TestEngine([PIPELINE])
    handle = await te.start("doc", {"url": "x"})
    assert await handle.result() == {"summary": "CONTE!|0.1|6.0"}
    assert SEEN["extract"][0] == UrlIn(url="x")
    assert SEEN["sentiment"] == TextOut(text="conte!", word_count=1)
    assert SEEN["keywords"] == SEEN["sentiment"]
    assert SEEN["join"] == Both(sentiment=Score(score=0.1), keywords=Score(score=6.0))
    assert SEEN["aggregate"] is None
    run = await te.get_run(handle.run_id)
    assert [(s.stage_id, s.execution_group, s.status) for s in run.stages] == [
        ("extract", 0, StageStatus.COMPLETED),
        ("sentiment", 1, StageStatus.COMPLETED),
        ("keywords", 1, StageStatus.COMPLETED),
        ("join", 2, StageStatus.COMPLETED),
        ("aggregate", 3, StageStatus.COMPLETED),
    ]
    [done] = [e for e in te.events if isinstance(e, WorkflowCompleted)]
    assert done.output == run.output


async def test_parallel_last_group_output_is_a_dict() -> None:
    """When the last group is parallel the run's output is a dict keyed by stage id."""
    wf = (
        WorkflowBuilder("par-end", input=UrlIn)
        .pipe(extract)
        .parallel([sentiment, keywords])
        .build()
    )
    te = TestEngine([wf])
    handle = await te.start("par-end", {"url": "abc"})
    assert await handle.result() == {"sentiment": {"score": 0.1}, "keywords": {"score": 6.0}}


async def test_config_defaults_and_overrides() -> None:
    """Config defaults are filled at run.create and overrides reach ctx.config."""
    SEEN.clear()
    te = TestEngine([PIPELINE])
    default = await te.start("doc", {"url": "x"})
    await default.result()
    assert SEEN["extract"][1] == ExtractConfig()
    assert (await te.get_run(default.run_id)).config == {
        "extract": {"max_length": 5, "suffix": "!"}
    }
    custom = await te.start("doc", {"url": "x"}, config={"extract": {"max_length": 100}})
    await custom.result()
    assert SEEN["extract"][1] == ExtractConfig(max_length=100)
    assert SEEN["sentiment"].text == "content of x!"


async def test_mock_stage_replaces_body_and_records_calls() -> None:
    """mock_stage swaps a stage body (function or constant) and records each call."""
    te = TestEngine([PIPELINE])
    mock = te.mock_stage("keywords", Score(score=42.0))
    fn_mock = te.mock_stage("sentiment", lambda ctx: {"score": float(ctx.input.word_count)})
    handle = await te.start("doc", {"url": "x"})
    assert await handle.result() == {"summary": "CONTE!|1.0|42.0"}
    assert mock.call_count == 1
    assert fn_mock.call_count == 1
    assert mock.calls[0].input == TextOut(text="conte!", word_count=1)
    assert mock.calls[0].stage_id == "keywords"


async def test_async_mock_function_is_awaited() -> None:
    """An async function given to mock_stage is awaited like a real async body."""
    te = TestEngine([PIPELINE])

    async def fake(ctx: Any) -> Score:
        return Score(score=3.0)

    te.mock_stage("keywords", fake)
    assert await (await te.start("doc", {"url": "x"})).result() == {"summary": "CONTE!|0.1|3.0"}


async def test_priority_orders_execution() -> None:
    """Higher priority runs execute first; equal priorities run in FIFO order."""
    order: list[int] = []

    class N(BaseModel):
        n: int

    @define_stage(id="record", input=N, output=N)
    async def record(ctx: StageContext[N, None]) -> N:
        order.append(ctx.input.n)
        return ctx.input

    te = TestEngine([WorkflowBuilder("prio", input=N).pipe(record).build()])
    for n, priority in [(1, 1), (2, 5), (3, 9), (4, 5), (5, 0)]:
        await te.start("prio", {"n": n}, priority=priority)
    await te.run_until_idle()
    assert order == [3, 2, 4, 1, 5]
    runs = await te.kernel.reads.list_runs()
    assert {r.status for r in runs} == {RunStatus.COMPLETED}


async def test_job_dequeue_orders_by_priority_then_fifo() -> None:
    """Jobs of higher-priority runs are leased before older lower-priority ones."""
    te = TestEngine([PIPELINE])
    low = await te.start("doc", {"url": "x"}, priority=1)
    high = await te.start("doc", {"url": "x"}, priority=8)
    await te.dispatch(c.RunClaimPending(worker_id="w"))
    jobs = await te.job_transport.dequeue("w", te.clock.now(), limit=2)
    assert [j.workflow_run_id for j in jobs] == [high.run_id, low.run_id]
    assert [j.priority for j in jobs] == [8, 1]
