"""Small workflows the CLI tests run: ``--app treadle.tests.cli.cliapp:workflows``.

Fast on purpose (no sleeps, retry delays of a few milliseconds), so each test's
real time is the CLI's own overhead.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import BaseModel

from treadle import (
    NotReady,
    Ready,
    RetryPolicy,
    StageContext,
    Suspend,
    WorkflowBuilder,
    WorkflowContext,
    define_batch_stage,
    define_stage,
    workflow,
)

APP = "treadle.tests.cli.cliapp:workflows"


class Name(BaseModel):
    name: str


class Greeting(BaseModel):
    text: str


class GreetConfig(BaseModel):
    punctuation: str = "!"


@define_stage(id="greet", input=Name, output=Greeting, config=GreetConfig)
async def greet(ctx: StageContext[Name, GreetConfig]) -> Greeting:
    return Greeting(text=f"hello {ctx.input.name}{ctx.config.punctuation}")


@define_stage(
    id="shout",
    input=Greeting,
    output=Greeting,
    retry=RetryPolicy(max_attempts=3, initial_delay=0.01, backoff=1.0),
)
async def shout(ctx: StageContext[Greeting, None]) -> Greeting:
    """Fails its first attempt, so every run shows one retry."""
    if ctx.attempt == 1:
        raise ConnectionError("upstream hiccup")
    return Greeting(text=ctx.input.text.upper() + " " + "x" * 200)


greeter = WorkflowBuilder("greeter", input=Name).pipe(greet).pipe(shout).build()


@define_stage(id="explode", input=Name, output=Greeting, retry=RetryPolicy(max_attempts=1))
async def explode(ctx: StageContext[Name, None]) -> Greeting:
    raise ValueError(f"cannot process {ctx.input.name}")


broken = WorkflowBuilder("broken", input=Name).pipe(explode).build()


@define_batch_stage(id="wait-batch", input=Name, output=Greeting)
async def wait_batch(ctx: StageContext[Name, None]) -> Greeting | Suspend:
    return Suspend(
        state={"name": ctx.input.name},
        poll_interval=timedelta(milliseconds=10),
        max_wait=timedelta(minutes=5),
    )


@wait_batch.check_completion
async def wait_batch_ready(state: dict[str, Any], ctx: StageContext[Name, None]) -> Any:
    if state["name"] == "never":
        return NotReady()
    return Ready(output=Greeting(text=f"batch done for {state['name']}"))


batch = WorkflowBuilder("batch", input=Name).pipe(wait_batch).build()

workflows: list[Any] = [greeter, broken, batch]


class Approval(BaseModel):
    approved: bool


@workflow(id="approval", input=Name, output=Greeting)
async def approval(ctx: WorkflowContext, req: Name) -> Greeting:
    """A code workflow that waits for the ``approve`` signal."""
    decision = await ctx.wait_for_signal("approve", Approval)
    return Greeting(text=f"{req.name} {'approved' if decision.approved else 'rejected'}")


workflows.append(approval)


def count_letters(name: str) -> int:
    return len(name)


def describe(letters: int) -> str:
    return f"{letters} letters"


@workflow(id="letters", input=Name, output=Greeting)
async def letters(ctx: WorkflowContext, req: Name) -> Greeting:
    """A code workflow of two steps (``treadle fork`` reruns the second)."""
    count: int = await ctx.step("count", count_letters, req.name)
    text: str = await ctx.step("describe", describe, count)
    return Greeting(text=text)


workflows.append(letters)


class Blow(BaseModel):
    note: str = ""


def _interrupt() -> None:
    raise KeyboardInterrupt("pressed in a stage")


ONCE = RetryPolicy(max_attempts=1)


@define_stage(id="interrupt-async", input=Blow, output=Greeting, retry=ONCE)
async def interrupt_async(ctx: StageContext[Blow, None]) -> Greeting:
    """Raises KeyboardInterrupt: a failed stage, never a dead worker."""
    _interrupt()
    return Greeting(text="unreachable")


@define_stage(id="interrupt-sync", input=Blow, output=Greeting, retry=ONCE)
def interrupt_sync(ctx: StageContext[Blow, None]) -> Greeting:
    """The same from a sync body (run in a thread)."""
    _interrupt()
    return Greeting(text="unreachable")


workflows.append(WorkflowBuilder("interrupter", input=Blow).pipe(interrupt_async).build())
workflows.append(WorkflowBuilder("interrupter-sync", input=Blow).pipe(interrupt_sync).build())


@workflow(id="steered", input=Name, output=Greeting)
async def steered(ctx: WorkflowContext, req: Name) -> Greeting:
    """Steered from the shell: publishes ``phase`` (``treadle query``), takes a ``rename``
    update (``treadle update``), then waits for a review (``treadle review``)."""
    letters: int = await ctx.step("count", count_letters, req.name)
    ctx.publish("phase", {"waiting": "rename", "letters": letters})
    request = await ctx.wait_for_update("rename", Name)
    await request.reply(f"renamed to {request.payload.name}")
    ctx.publish("phase", {"waiting": "review", "name": request.payload.name})
    decision = await ctx.review({"name": request.payload.name}, reviewers=["ops"])
    return Greeting(text=f"{request.payload.name} {decision.decision}")


workflows.append(steered)


@workflow(id="napper", input=Name, output=Greeting)
async def napper(ctx: WorkflowContext, req: Name) -> Greeting:
    """One step, then a long sleep: ``runs show`` lists the step and the sleep's timer."""
    text: str = await ctx.step("describe", describe, len(req.name))
    await ctx.sleep(timedelta(hours=6), name="nap")
    return Greeting(text=text)


workflows.append(napper)


class ClipConfig(BaseModel):
    max_length: int = 3


@define_stage(
    id="clip", input=Greeting, output=Greeting, config=ClipConfig, retry=RetryPolicy(max_attempts=1)
)
async def clip(ctx: StageContext[Greeting, ClipConfig]) -> Greeting:
    """Fails when the config's ``max_length`` is too small: ``rerun --config`` fixes it."""
    if len(ctx.input.text) > ctx.config.max_length:
        raise ValueError(f"{ctx.input.text!r} is longer than max_length={ctx.config.max_length}")
    return ctx.input


clipped = WorkflowBuilder("clipped", input=Name).pipe(greet).pipe(clip).build()
workflows.append(clipped)


def refuse(name: str) -> str:
    raise ValueError(f"refusing {name}")


@workflow(id="refuser", input=Name, output=Greeting)
async def refuser(ctx: WorkflowContext, req: Name) -> Greeting:
    """A step that fails both its attempts: runs show lists them and the failed entry."""
    text: str = await ctx.step(
        "refuse", refuse, req.name, retry=RetryPolicy(max_attempts=2, initial_delay=0.01)
    )
    return Greeting(text=text)


workflows.append(refuser)


@workflow(id="relay", input=Name, output=Greeting)
async def relay(ctx: WorkflowContext, req: Name) -> Greeting:
    """Continues as new once: ``runs show`` names both links of the chain."""
    if req.name != "second":
        ctx.continue_as_new(Name(name="second"))
    return Greeting(text=f"hello {req.name}")


workflows.append(relay)
