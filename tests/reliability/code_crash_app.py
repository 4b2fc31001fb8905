"""The code workflow the code-workflow crash tests run in real worker processes
(``--app code_crash_app:workflows``).

Each step execution appends ``<pid> <step> <attempt>`` to ``steps.log`` in
``$TREADLE_CRASH_DIR``. The first execution of ``two`` then creates ``entered-two`` and
blocks until its process is killed (it polls for a ``go`` file nobody creates); a later
execution of ``two`` finishes at once, so a second worker completes the run quickly.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from pydantic import BaseModel

from treadle import WorkflowContext, workflow


class Job(BaseModel):
    n: int


def _dir() -> Path:
    return Path(os.environ["TREADLE_CRASH_DIR"])


def _record(step: str) -> list[str]:
    """Append this execution to ``steps.log``; returns the log's lines before it."""
    info = WorkflowContext.current_step()
    attempt = info.attempt if info is not None else 0
    log = _dir() / "steps.log"
    before = log.read_text().splitlines() if log.exists() else []
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()} {step} {attempt}\n")
    return before


async def one(n: int) -> int:
    _record("one")
    return n + 1


async def two(n: int) -> int:
    before = _record("two")
    if not any(line.split()[1] == "two" for line in before):
        (_dir() / "entered-two").touch()
        while not (_dir() / "go").exists():  # noqa: ASYNC110 - the signal is another process's file
            await asyncio.sleep(0.02)
    return n * 10


async def three(n: int) -> int:
    _record("three")
    return n + 3


@workflow(id="three-steps", input=Job, output=list[int])
async def three_steps(ctx: WorkflowContext, job: Job) -> list[int]:
    a: int = await ctx.step("one", one, job.n)
    b: int = await ctx.step("two", two, a)
    c: int = await ctx.step("three", three, b)
    return [a, b, c]


workflows = [three_steps]
