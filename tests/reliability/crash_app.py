"""The app the crash tests run in real worker processes (``--app crash_app:workflows``).

Stages talk to the test through files in ``$TREADLE_CRASH_DIR``, never through timing:
each attempt appends ``<stage> <attempt>`` to ``attempts.log`` and then creates
``entered-<stage>-<attempt>``; a first attempt then blocks until the test creates
``go`` (the drain test) or forever (the SIGKILL and release tests). Later attempts
finish at once, so a second worker completes the run quickly.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from pydantic import BaseModel

from treadle import RetryPolicy, StageContext, WorkflowBuilder, define_stage

FAST_RETRY = RetryPolicy(max_attempts=5, initial_delay=0.05, backoff=1.0)


class Item(BaseModel):
    name: str


class Done(BaseModel):
    name: str
    attempt: int


def _dir() -> Path:
    return Path(os.environ["TREADLE_CRASH_DIR"])


def _enter(stage: str, attempt: int) -> None:
    with (_dir() / "attempts.log").open("a", encoding="utf-8") as fh:
        fh.write(f"{stage} {attempt}\n")
    (_dir() / f"entered-{stage}-{attempt}").touch()


@define_stage(id="slow", input=Item, output=Done, retry=FAST_RETRY)
async def slow(ctx: StageContext[Item, None]) -> Done:
    _enter("slow", ctx.attempt)
    if ctx.attempt == 1:
        while not (_dir() / "go").exists():  # noqa: ASYNC110 - the signal is another process's file
            await asyncio.sleep(0.02)
    return Done(name=ctx.input.name, attempt=ctx.attempt)


@define_stage(id="slow-sync", input=Item, output=Done, retry=FAST_RETRY)
def slow_sync(ctx: StageContext[Item, None]) -> Done:
    _enter("slow-sync", ctx.attempt)
    if ctx.attempt == 1:
        while not (_dir() / "go").exists():
            time.sleep(0.02)
    return Done(name=ctx.input.name, attempt=ctx.attempt)


@define_stage(id="finish", input=Done, output=Done, retry=FAST_RETRY)
async def finish(ctx: StageContext[Done, None]) -> Done:
    _enter("finish", ctx.attempt)
    return ctx.input


crash_async = WorkflowBuilder("crash-async", input=Item).pipe(slow).pipe(finish).build()
crash_sync = WorkflowBuilder("crash-sync", input=Item).pipe(slow_sync).pipe(finish).build()

workflows = [crash_async, crash_sync]
