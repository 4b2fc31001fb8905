"""Annotations: kernel.annotations.attach/list and ctx.annotate, whose attributes are
merged into the run's search attributes."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from treadle import RetryPolicy, WorkflowBuilder, define_stage
from treadle.kernel.errors import RunNotFoundError, TreadleValidationError
from treadle.kernel.events import AnnotationCreated
from treadle.kernel.model import RunFilter, RunStatus
from treadle.testing import TestEngine


class In(BaseModel):
    n: int


@define_stage(id="tag", input=In, output=In, retry=RetryPolicy(initial_delay=1.0))
async def tag(ctx):  # type: ignore[no-untyped-def]
    ctx.annotate({"model": "v2", "attempt": ctx.attempt}, actor="stage", scope="quality")
    if ctx.attempt == 1:
        raise ConnectionError("retry me")
    return ctx.input


WF = WorkflowBuilder("wf", input=In).pipe(tag).build()


async def test_attach_and_list() -> None:
    """attach stores the annotation, merges attributes into search attributes, emits
    annotation:created; list filters by key, prefix and scope."""
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": 1}, search_attributes={"customer": "acme"})
    ann = te.kernel.annotations
    first = await ann.attach(handle.run_id, {"review.score": 4}, actor="alice", scope="qa")
    await ann.attach(handle.run_id, {"region": "eu", "review.by": "bob"})
    assert first.actor == "alice"
    assert first.created_at == te.clock.now()
    run = await te.get_run(handle.run_id)
    assert run.search_attributes == {
        "customer": "acme",
        "review.score": 4,
        "region": "eu",
        "review.by": "bob",
    }
    assert [a.attributes for a in await ann.list(handle.run_id, key="region")] == [
        {"region": "eu", "review.by": "bob"}
    ]
    assert len(await ann.list(handle.run_id, key_prefix="review.")) == 2
    assert [a.id for a in await ann.list(handle.run_id, scope="qa")] == [first.id]
    assert len(await ann.list(handle.run_id, limit=1)) == 1
    events = [
        e for e in await te.kernel.reads.events(handle.run_id) if isinstance(e, AnnotationCreated)
    ]
    assert events[0].annotation_id == first.id
    found = await te.kernel.reads.list_runs(RunFilter(attributes={"region": "eu"}))
    assert [r.id for r in found] == [handle.run_id]


async def test_attach_idempotency_key_returns_first() -> None:
    """A repeated idempotency_key returns the first annotation and writes nothing new."""
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": 1})
    ann = te.kernel.annotations
    first = await ann.attach(handle.run_id, {"a": 1}, idempotency_key="once")
    again = await ann.attach(handle.run_id, {"a": 2}, idempotency_key="once")
    assert again == first
    assert len(await ann.list(handle.run_id)) == 1
    assert (await te.get_run(handle.run_id)).search_attributes == {"a": 1}


async def test_attach_validates_attributes_and_run() -> None:
    """Non-scalar values, empty keys and unknown runs are rejected; nothing is written."""
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": 1})
    ann = te.kernel.annotations
    with pytest.raises(TreadleValidationError, match=r"attributes\.nested"):
        await ann.attach(handle.run_id, {"nested": {"x": 1}})
    with pytest.raises(TreadleValidationError, match="keys"):
        await ann.attach(handle.run_id, {"": 1})
    with pytest.raises(TreadleValidationError, match="mapping"):
        await ann.attach(handle.run_id, ["x"])  # type: ignore[arg-type]
    with pytest.raises(RunNotFoundError):
        await ann.attach("missing", {"a": 1})
    assert await ann.list(handle.run_id) == []


async def test_ctx_annotate_is_committed_with_the_stage_outcome() -> None:
    """ctx.annotate is buffered and committed with each attempt's outcome (here a failed
    attempt, then the successful one that also completes the run)."""
    te = TestEngine([WF])
    handle = await te.start("wf", {"n": 1})
    await te.run_until_idle()
    assert [a.attributes["attempt"] for a in await te.kernel.annotations.list(handle.run_id)] == [1]
    await te.advance_time(1)
    assert await handle.result() == {"n": 1}
    annotations = await te.kernel.annotations.list(handle.run_id)
    assert [(a.attributes["attempt"], a.stage_id, a.actor, a.scope) for a in annotations] == [
        (1, "tag", "stage", "quality"),
        (2, "tag", "stage", "quality"),
    ]
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.COMPLETED
    assert run.search_attributes == {"model": "v2", "attempt": 2}


async def test_annotate_in_last_stage_of_parallel_group_advances_run() -> None:
    """A stage that annotates and whose completion advances the run commits both."""

    @define_stage(id="a", input=In, output=In)
    async def a(ctx):  # type: ignore[no-untyped-def]
        ctx.annotate({"a": True})
        return ctx.input

    @define_stage(id="b", input=In, output=In)
    async def b(ctx):  # type: ignore[no-untyped-def]
        ctx.annotate({"b": True})
        return ctx.input

    @define_stage(id="c", input="none", output=In)
    async def c(ctx):  # type: ignore[no-untyped-def]
        return ctx.require("a")

    te = TestEngine([WorkflowBuilder("p", input=In).parallel([a, b]).pipe(c).build()])
    handle = await te.start("p", {"n": 3})
    assert await handle.result() == {"n": 3}
    run = await te.get_run(handle.run_id)
    assert run.search_attributes == {"a": True, "b": True}
    assert all(s.attempt == 1 for s in run.stages)
