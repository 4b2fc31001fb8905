"""Workflows the dashboard tests (page tests and browser tests) run, and a `<script>`
payload that must never execute."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pydantic import BaseModel

from treadle import (
    RetryPolicy,
    StageContext,
    WorkflowBuilder,
    WorkflowContext,
    define_stage,
    workflow,
)
from treadle.kernel.ai import AICall

XSS = (
    '<script>document.title="pwned";window.__pwned=1;alert("xss")</script>'
    '<img src=x onerror="window.__pwned=1">'
)
"""A payload that would run script if any page rendered it as HTML."""


class Doc(BaseModel):
    title: str


class Scored(BaseModel):
    title: str
    score: int


@define_stage(
    id="fetch",
    input=Doc,
    output=Doc,
    retry=RetryPolicy(max_attempts=3, initial_delay=0.05, backoff=1.0),
)
async def fetch(ctx: StageContext[Doc, Any]) -> Doc:
    if ctx.input.title.startswith("fail"):
        raise ValueError(f"cannot fetch {ctx.input.title!r}: no such document")
    if ctx.attempt == 1:
        raise RuntimeError("upstream timed out (first attempt fails on purpose)")
    return ctx.input


@define_stage(id="score", input=Doc, output=Scored)
async def score(ctx: StageContext[Doc, Any]) -> Scored:
    """Records what a model call cost (the dashboard shows the run's AI cost)."""
    ctx.ai.record(
        AICall(
            model="test-model",
            prompt="SECRET-PROMPT: score this",
            cost=Decimal("0.0125"),
            input_tokens=100,
            output_tokens=20,
        )
    )
    return Scored(title=ctx.input.title, score=len(ctx.input.title))


@define_stage(id="tag", input=Doc, output=Doc)
async def tag(ctx: StageContext[Doc, Any]) -> Doc:
    return ctx.input


@define_stage(id="publish", input="none", output=Scored)
async def publish(ctx: StageContext[Any, Any]) -> Scored:
    return Scored.model_validate(ctx.require("score"))


report = (
    WorkflowBuilder("report", input=Doc, description="fetch, score and tag, publish")
    .pipe(fetch)
    .parallel([score, tag])
    .pipe(publish)
    .build()
)


async def prepare(title: str) -> str:
    return title.upper()


@workflow(id="gated", input=Doc)
async def gated(ctx: WorkflowContext, doc: Doc) -> dict[str, Any]:
    """Prepares, waits for the signal ``go``, then ends with what it carried."""
    await ctx.step("prepare", prepare, doc.title)
    go = await ctx.wait_for_signal("go")
    return {"title": doc.title, "go": go}


@workflow(id="approval", input=Doc)
async def approval(ctx: WorkflowContext, doc: Doc) -> str:
    """Asks a person to approve ``doc`` (shown as the review's artifact)."""
    decision = await ctx.review({"title": doc.title}, review_type="publish", reviewers=["ops"])
    return decision.decision


WORKFLOWS = [report, gated, approval]
