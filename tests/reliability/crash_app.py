"""The app the crash tests run in real worker processes (``--app crash_app:workflows``).

Stages talk to the test through files in ``$TREADLE_CRASH_DIR``, never through timing:
each execution appends ``<stage> <attempt>`` to ``attempts.log`` and then creates
``entered-<stage>-<attempt>``; a stage's first execution then blocks until the test
creates ``go`` (the drain test) or forever (the SIGKILL and release tests). Later
executions finish at once, so a second worker completes the run quickly. (A released
job's next execution has the same attempt number: a worker's shutdown refunds it.)
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


def _enter(stage: str, attempt: int) -> bool:
    """Record this execution; whether it is the stage's first."""
    log = _dir() / "attempts.log"
    seen = log.read_text(encoding="utf-8").split("\n") if log.exists() else []
    first = not any(line.split(" ")[0] == stage for line in seen if line)
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"{stage} {attempt}\n")
    (_dir() / f"entered-{stage}-{attempt}").touch()
    return first


@define_stage(id="slow", input=Item, output=Done, retry=FAST_RETRY)
async def slow(ctx: StageContext[Item, None]) -> Done:
    if _enter("slow", ctx.attempt):
        while not (_dir() / "go").exists():  # noqa: ASYNC110 - the signal is another process's file
            await asyncio.sleep(0.02)
    return Done(name=ctx.input.name, attempt=ctx.attempt)


@define_stage(id="slow-sync", input=Item, output=Done, retry=FAST_RETRY)
def slow_sync(ctx: StageContext[Item, None]) -> Done:
    if _enter("slow-sync", ctx.attempt):
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
