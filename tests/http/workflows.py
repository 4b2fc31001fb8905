"""Workflows the HTTP tests drive: a code workflow that waits for a signal, answers an
update, publishes state and asks for a review; a two-stage pipeline for rerun-from."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import BaseModel

from treadle import StageContext, WorkflowBuilder, WorkflowContext, define_stage, workflow


class Order(BaseModel):
    item: str
    quantity: int = 1


@workflow(id="checkout", input=Order)
async def checkout(ctx: WorkflowContext, order: Order) -> dict[str, Any]:
    """Publishes ``state``, answers update ``ping``, waits for signal ``approval``."""
    ctx.publish("state", {"item": order.item, "stage": "waiting"})
    update = await ctx.wait_for_update("ping", timeout=timedelta(hours=1))
    await update.reply({"pong": update.payload})
    approval = await ctx.wait_for_signal("approval", timeout=timedelta(hours=1))
    ctx.publish("state", {"item": order.item, "stage": "approved"})
    return {"item": order.item, "approval": approval}


@workflow(id="reviewed", input=Order)
async def reviewed(ctx: WorkflowContext, order: Order) -> dict[str, Any]:
    """Asks for a review of the order and returns the decision."""
    decision = await ctx.review({"item": order.item}, reviewers=["ops"])
    return {"decision": decision.decision, "reviewer": decision.reviewer}


@workflow(id="steps", input=Order)
async def steps(ctx: WorkflowContext, order: Order) -> list[str]:
    """Two journaled steps (forkable), then a wait for signal ``go``."""

    async def label(name: str) -> str:
        return f"{name}:{order.item}"

    first = await ctx.step("first", label, "a")
    second = await ctx.step("second", label, "b")
    await ctx.wait_for_signal("go", timeout=timedelta(hours=1))
    return [first, second]


class Text(BaseModel):
    text: str


@define_stage(id="upper", input=Order, output=Text)
async def upper(ctx: StageContext[Order, None]) -> Text:
    return Text(text=ctx.input.item.upper())


@define_stage(id="exclaim", input=Text, output=Text)
async def exclaim(ctx: StageContext[Text, None]) -> Text:
    return Text(text=ctx.input.text + "!")


shout = (
    WorkflowBuilder("shout", input=Order, description="Upper-case, then exclaim")
    .pipe(upper)
    .pipe(exclaim)
    .build()
)

WORKFLOWS = [checkout, reviewed, steps, shout]
