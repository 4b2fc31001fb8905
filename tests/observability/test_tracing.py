"""Spans: a run's stages, activations and steps join the caller's trace, on any worker."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode
from pydantic import BaseModel

from treadle import (
    Engine,
    Ready,
    RetryPolicy,
    Suspend,
    TreadleValidationError,
    WorkflowBuilder,
    WorkflowContext,
    define_batch_stage,
    define_stage,
    workflow,
)
from treadle.adapters.otel import derived_trace_context
from treadle.kernel import commands as c
from treadle.testing import TestEngine
from treadle.tests.observability.conftest import Otel


class Num(BaseModel):
    n: int


class Approval(BaseModel):
    approved: bool


def _parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _attempt_workflow(failures: dict[str, int]) -> object:
    async def charge(n: int) -> int:
        failures["charge"] += 1
        if failures["charge"] == 1:
            raise RuntimeError("card declined")
        return n + 1

    @workflow(id="order", input=Num, output=Num)
    async def order(ctx: WorkflowContext, inp: Num) -> Num:
        charged = await ctx.step(
            "charge", charge, inp.n, retry=RetryPolicy(max_attempts=3, initial_delay=1.0)
        )
        await ctx.sleep(timedelta(hours=1))
        approval = await ctx.wait_for_signal("approval", Approval, timeout=timedelta(days=1))
        return Num(n=charged if approval.approved else 0)

    return order


async def test_a_code_workflow_with_a_retry_a_sleep_and_a_signal_produces_the_span_tree(
    otel: Otel,
) -> None:
    """Activations are children of the start, steps of their activation; waits are events."""
    te = TestEngine([_attempt_workflow({"charge": 0})], telemetry=otel.telemetry)  # type: ignore[list-item]
    tracer = otel.tracer_provider.get_tracer("app")
    with tracer.start_as_current_span("caller") as caller:
        handle = await te.start("order", {"n": 1})
    await te.run_until_idle()  # charge fails, the retry waits 1 s
    await te.advance_time(timedelta(seconds=2))  # charge succeeds, then the sleep
    await te.advance_time(timedelta(hours=1))  # the sleep ends, the signal is awaited
    await te.signal(handle.run_id, "approval", {"approved": True})
    await te.run_until_idle()
    assert (await te.get_run(handle.run_id)).output == {"n": 2}

    trace_id = caller.get_span_context().trace_id
    spans = otel.finished()
    assert {s.context.trace_id for s in spans} == {trace_id}
    (start,) = otel.named("treadle.start order")
    assert _parent_id(start) == caller.get_span_context().span_id
    activations = sorted(otel.named("treadle.activation order"), key=lambda s: s.start_time or 0)
    assert [s.attributes["treadle.outcome"] for s in activations] == [
        "suspended",
        "suspended",
        "suspended",
        "completed",
    ]
    assert all(_parent_id(s) == start.context.span_id for s in activations)
    waits = [
        [
            dict(e.attributes or {}).get("treadle.wait.kind")
            for e in s.events
            if e.name == "treadle.wait"
        ]
        for s in activations
    ]
    assert waits == [["retry"], ["sleep"], ["signal"], []]
    (signal_wait,) = [e for e in activations[2].events if e.name == "treadle.wait"]
    assert dict(signal_wait.attributes or {})["treadle.wait.signal"] == "approval"
    steps = sorted(otel.named("treadle.step charge"), key=lambda s: s.start_time or 0)
    assert [s.attributes["treadle.attempt"] for s in steps] == [1, 2]
    assert [s.attributes["treadle.outcome"] for s in steps] == ["failed", "completed"]
    assert [_parent_id(s) for s in steps] == [
        activations[0].context.span_id,
        activations[1].context.span_id,
    ]
    failed = steps[0]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes["treadle.will_retry"] is True
    (exc,) = [e for e in failed.events if e.name == "exception"]
    assert "card declined" in str(exc.attributes["exception.message"])
    for span in activations + steps:
        assert span.attributes["treadle.run.id"] == handle.run_id
        assert span.attributes["treadle.workflow.id"] == "order"
        assert span.attributes["treadle.workflow.version"] == "1"


def _pipeline(otel: Otel, failures: dict[str, int]) -> object:
    tracer = otel.tracer_provider.get_tracer("app")

    @define_stage(id="fetch", input=Num, output=Num)
    async def fetch(ctx: object) -> Num:
        return Num(n=ctx.input.n + 1)  # type: ignore[attr-defined]

    @define_stage(
        id="store", input=Num, output=Num, retry=RetryPolicy(max_attempts=2, initial_delay=0.01)
    )
    async def store(ctx: object) -> Num:
        with tracer.start_as_current_span("db.insert"):  # the user's own instrumentation
            failures["store"] += 1
            if failures["store"] == 1:
                raise ConnectionError("db away")
        return Num(n=ctx.input.n * 10)  # type: ignore[attr-defined]

    return WorkflowBuilder("etl", input=Num).pipe(fetch).pipe(store).build()


async def test_stage_spans_join_the_callers_trace_and_the_users_spans_nest(otel: Otel) -> None:
    """Each stage attempt is a child of the start; a user span in a body is its child."""
    pipeline = _pipeline(otel, {"store": 0})
    async with await Engine.open("memory://", [pipeline], telemetry=otel.telemetry) as engine:  # type: ignore[list-item]
        async with engine.worker(orchestration_interval=0.05, job_poll_interval=0.05):
            tracer = otel.tracer_provider.get_tracer("app")
            with tracer.start_as_current_span("request") as request:
                handle = await engine.start("etl", {"n": 1})
            assert await handle.result(timeout=20) == {"n": 20}
        run = await engine.get_run(handle.run_id)
    (start,) = otel.named("treadle.start etl")
    assert run.trace_context is not None
    assert run.trace_context.startswith(
        f"00-{start.context.trace_id:032x}-{start.context.span_id:016x}-"
    )
    assert _parent_id(start) == request.get_span_context().span_id
    stages = sorted(otel.named("treadle.stage"), key=lambda s: s.start_time or 0)
    assert [
        (s.name, s.attributes["treadle.attempt"], s.attributes["treadle.outcome"]) for s in stages
    ] == [
        ("treadle.stage fetch", 1, "completed"),
        ("treadle.stage store", 1, "failed"),
        ("treadle.stage store", 2, "completed"),
    ]
    assert all(_parent_id(s) == start.context.span_id for s in stages)
    assert stages[1].status.status_code is StatusCode.ERROR
    assert any(e.name == "exception" for e in stages[1].events)
    inserts = otel.named("db.insert")
    assert sorted(_parent_id(s) for s in inserts) == sorted(s.context.span_id for s in stages[1:])
    assert {s.context.trace_id for s in otel.finished()} == {request.get_span_context().trace_id}


async def test_a_child_workflow_joins_its_parents_trace(otel: Otel) -> None:
    """The child's activations are in the parent's trace, under the parent's start."""

    @workflow(id="child", input=Num, output=Num)
    async def child(ctx: WorkflowContext, inp: Num) -> Num:
        return Num(n=inp.n * 2)

    @workflow(id="parent", input=Num, output=Num)
    async def parent(ctx: WorkflowContext, inp: Num) -> Num:
        return Num.model_validate(await ctx.child("child", inp))

    te = TestEngine([child, parent], telemetry=otel.telemetry)
    handle = await te.start("parent", {"n": 4})
    await te.run_until_idle()
    assert (await te.get_run(handle.run_id)).output == {"n": 8}
    (start,) = otel.named("treadle.start parent")
    children = otel.named("treadle.activation child")
    assert children
    assert {s.context.trace_id for s in children} == {start.context.trace_id}
    assert {_parent_id(s) for s in children} == {start.context.span_id}


async def test_a_run_without_a_stored_context_gets_a_trace_derived_from_its_id(
    otel: Otel,
) -> None:
    """A run created with no trace context (a schedule, tracing off at its start) still
    has all its spans in one trace, the same in every process."""
    pipeline = _pipeline(otel, {"store": 1})
    te = TestEngine([pipeline], telemetry=otel.telemetry)  # type: ignore[list-item]
    created = await te.kernel.dispatch(c.RunCreate(workflow_id="etl", input={"n": 1}))
    await te.run_until_idle()
    derived = derived_trace_context(created.workflow_run_id)
    stages = otel.named("treadle.stage")
    assert len(stages) == 2
    assert {f"{s.context.trace_id:032x}" for s in stages} == {derived.split("-")[1]}
    assert {f"{_parent_id(s):016x}" for s in stages} == {derived.split("-")[2]}


async def test_trace_context_is_stored_with_the_run(otel: Otel, treadle_database_url: str) -> None:
    """SQLite and PostgreSQL keep the run's traceparent; a malformed one is refused."""
    pipeline = _pipeline(otel, {"store": 1})
    async with await Engine.open(
        treadle_database_url,
        [pipeline],
        telemetry=otel.telemetry,  # type: ignore[list-item]
    ) as engine:
        handle = await engine.start("etl", {"n": 1})
        run = await engine.get_run(handle.run_id)
        (start,) = otel.named("treadle.start etl")
        assert run.trace_context is not None
        assert run.trace_context.split("-")[1] == f"{start.context.trace_id:032x}"
        with pytest.raises(TreadleValidationError) as info:
            await engine.kernel.dispatch(
                {
                    "type": "run.create",
                    "workflow_id": "etl",
                    "input": {"n": 1},
                    "trace_context": "x",
                }
            )
        assert "trace_context" in str(info.value)
        assert len(await engine.list(workflow_id="etl")) == 1  # the refused one wrote nothing


def test_tracing_off_imports_no_opentelemetry() -> None:
    """Without ``telemetry=``, a run executes without loading OpenTelemetry at all."""
    program = textwrap.dedent(
        """
        import asyncio, sys
        from pydantic import BaseModel
        from treadle import Engine, WorkflowBuilder, define_stage

        class N(BaseModel):
            n: int

        @define_stage(id="a", input=N, output=N)
        async def a(ctx):
            return N(n=ctx.input.n + 1)

        async def main():
            wf = WorkflowBuilder("w", input=N).pipe(a).build()
            async with await Engine.open("memory://", [wf]) as engine:
                async with engine.worker():
                    handle = await engine.start("w", {"n": 1})
                    assert await handle.result(timeout=20) == {"n": 2}
            loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
            assert not loaded, loaded
            print("ok")

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


async def test_a_batch_stage_that_suspends_records_its_next_poll(otel: Otel) -> None:
    """The suspended attempt's span notes when it is polled next; no span stays open."""

    @define_batch_stage(id="render", input=Num, output=Num)
    async def render(ctx: object) -> object:
        return Suspend(state={"job": 1}, poll_interval=timedelta(minutes=5))

    @render.check_completion
    async def render_done(state: object, ctx: object) -> object:
        return Ready(Num(n=7))

    te = TestEngine(
        [WorkflowBuilder("batch", input=Num).pipe(render).build()], telemetry=otel.telemetry
    )
    handle = await te.start("batch", {"n": 1})
    await te.run_until_idle()
    await te.advance_time(timedelta(minutes=6))
    assert (await te.get_run(handle.run_id)).output == {"n": 7}
    (span,) = otel.named("treadle.stage render")
    assert span.attributes["treadle.outcome"] == "suspended"
    (wait,) = [dict(e.attributes or {}) for e in span.events if e.name == "treadle.wait"]
    assert wait["treadle.wait.kind"] == "poll"
    assert wait["treadle.wait.until"].startswith(str(te.clock.now().year))


async def test_a_remote_stage_is_handed_the_runs_trace_context(otel: Otel) -> None:
    """``job.begin`` gives a remote worker the run's ``traceparent`` to parent its spans."""

    @define_stage(id="outside", input=Num, output=Num, remote=True)
    def outside(ctx: object) -> Num:
        raise AssertionError("runs on a remote worker")

    te = TestEngine(
        [WorkflowBuilder("far", input=Num).pipe(outside).build()], telemetry=otel.telemetry
    )
    with otel.tracer_provider.get_tracer("app").start_as_current_span("caller"):
        handle = await te.start("far", {"n": 1})
    await te.run_until_idle()
    (job,) = await te.kernel.deps.job_transport.dequeue(
        "remote:1", te.clock.now(), limit=1, stage_ids=["outside"]
    )
    begun = await te.kernel.dispatch(c.JobBegin(job_id=job.id, worker_id="remote:1"))
    run = await te.get_run(handle.run_id)
    assert begun.started
    assert begun.trace_context is not None
    assert begun.trace_context == run.trace_context
    (start,) = otel.named("treadle.start far")
    assert begun.trace_context.split("-")[2] == f"{start.context.span_id:016x}"
