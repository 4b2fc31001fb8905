"""Stage input models that name their fields by pydantic alias: a join after a parallel
group of kebab-case stage ids, and a chain whose producer writes aliases. Built, then
run by a worker on memory, a SQLite file and PostgreSQL."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from treadle import Engine, RunStatus, WorkflowBuilder, define_stage
from treadle.testing import TestEngine
from treadle.tests.scenario.helpers import until_status, worker


class Num(BaseModel):
    n: int


@define_stage(id="plus-one", input=Num, output=Num)
async def plus_one(ctx):  # type: ignore[no-untyped-def]
    return Num(n=ctx.input.n + 1)


@define_stage(id="times-ten", input=Num, output=Num)
async def times_ten(ctx):  # type: ignore[no-untyped-def]
    return Num(n=ctx.input.n * 10)


class Both(BaseModel):
    """The parallel group's output, keyed by stage id, read through aliases."""

    plus_one: Num = Field(alias="plus-one")
    times_ten: Num = Field(alias="times-ten")


class Total(BaseModel):
    """Written by alias (``serialize_by_alias``), so a reader by alias finds its keys."""

    model_config = ConfigDict(serialize_by_alias=True)

    grand_total: int = Field(alias="grand-total")


class ReadsTotal(BaseModel):
    grand_total: int = Field(alias="grand-total")


@define_stage(id="sum", input=Both, output=Total)
async def add(ctx):  # type: ignore[no-untyped-def]
    return Total.model_validate({"grand-total": ctx.input.plus_one.n + ctx.input.times_ten.n})


@define_stage(id="report", input=ReadsTotal, output=Num)
async def report(ctx):  # type: ignore[no-untyped-def]
    return Num(n=ctx.input.grand_total)


ALIASED = (
    WorkflowBuilder("aliased", input=Num)
    .parallel([plus_one, times_ten])
    .pipe(add)
    .pipe(report)
    .build()
)
WORKFLOWS = [ALIASED]


async def test_aliased_stage_inputs_build_and_run_on_every_backend(engine: Engine) -> None:
    """The build accepts fields named by alias, and at run time each stage's input
    validates by those aliases: (2 + 1) + (2 * 10) flows through to the last stage."""
    handle = await engine.start("aliased", {"n": 2})
    async with worker(engine):
        await until_status(engine, handle.run_id, RunStatus.COMPLETED, RunStatus.FAILED)
    run = await engine.get_run(handle.run_id)
    assert run.status is RunStatus.COMPLETED, run.error
    outputs = {stage.stage_id: stage.output for stage in run.stages}
    assert outputs["sum"] == {"grand-total": 23}
    assert run.output == {"n": 23}


class Snake(BaseModel):
    plus_one: int


class EitherWay(BaseModel):
    """Validates by alias or, with ``populate_by_name``, by field name."""

    model_config = ConfigDict(populate_by_name=True)

    plus_one: int = Field(alias="plus-one")


@define_stage(id="first", input=EitherWay, output=Num)
async def first(ctx):  # type: ignore[no-untyped-def]
    return Num(n=ctx.input.plus_one)


async def test_populate_by_name_reads_a_producer_that_writes_field_names() -> None:
    """With populate_by_name an aliased field also reads the field name the workflow
    input is stored under, in the build check and in the TestEngine run alike."""
    te = TestEngine([WorkflowBuilder("snake", input=Snake).pipe(first).build()])
    handle = await te.start("snake", {"plus_one": 4})
    await te.run_until_idle()
    assert await handle.result() == {"n": 4}
