"""Workflows the observability tests run in worker processes:
``--app treadle.tests.observability.otelapp:workflows``.

``relay``'s second stage blocks forever on the worker named ``A`` (``TREADLE_TEST_WORKER``)
so a test can SIGKILL that worker in the middle of it; any other worker completes it.
"""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel

from treadle import RetryPolicy, StageContext, WorkflowBuilder, define_stage


class Num(BaseModel):
    n: int


@define_stage(id="first", input=Num, output=Num)
async def first(ctx: StageContext[Num, None]) -> Num:
    ctx.log("info", "first stage", n=ctx.input.n)
    return Num(n=ctx.input.n + 1)


@define_stage(id="second", input=Num, output=Num, retry=RetryPolicy(max_attempts=3))
async def second(ctx: StageContext[Num, None]) -> Num:
    if os.environ.get("TREADLE_TEST_WORKER") == "A":
        await asyncio.Event().wait()  # until the test kills this worker
    return Num(n=ctx.input.n * 10)


relay = WorkflowBuilder("relay", input=Num).pipe(first).pipe(second).build()


@define_stage(
    id="explode", input=Num, output=Num, retry=RetryPolicy(max_attempts=2, initial_delay=0.01)
)
async def explode(ctx: StageContext[Num, None]) -> Num:
    raise ValueError("bad data")


broken = WorkflowBuilder("broken", input=Num).pipe(explode).build()

workflows = [relay, broken]
