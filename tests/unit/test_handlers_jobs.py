"""job.execute: the three phases, output validation, ghosts, the duplicate-completion
guard, release after errors, and everything a StageContext offers."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import NonRetryableError, RetryPolicy, Suspend, WorkflowBuilder, define_stage
from treadle.kernel import commands as c
from treadle.kernel.errors import StageNotFoundError, WorkflowNotFoundError
from treadle.kernel.events import StageFailed, StageProgress
from treadle.kernel.model import JobStatus, RunStatus, StageStatus
from treadle.testing import TestEngine


class In(BaseModel):
    n: int


class Out(BaseModel):
    text: str
    count: int


def _wf(stage: Any, wf_id: str = "wf", input: Any = In) -> Any:
    return WorkflowBuilder(wf_id, input=input).pipe(stage).build()


async def _lease(te: TestEngine, worker: str = "w") -> Any:
    """Claim pending runs and lease one job for ``worker``."""
    await te.dispatch(c.RunClaimPending(worker_id=worker))
    [job] = await te.job_transport.dequeue(worker, te.clock.now())
    return job


async def _stage(te: TestEngine, run_id: str, stage_id: str) -> Any:
    run = await te.get_run(run_id)
    return next(s for s in run.stages if s.stage_id == stage_id)


# -- output and input validation -------------------------------------------------------


async def test_wrong_output_shape_fails_non_retryably_naming_the_field() -> None:
    """A stage returning the wrong shape fails at once (no retry) with the field named."""

    @define_stage(id="bad", input=In, output=Out, retry=RetryPolicy(max_attempts=5))
    async def bad(ctx):  # type: ignore[no-untyped-def]
        return {"text": "x"}

    te = TestEngine([_wf(bad)])
    handle = await te.start("wf", {"n": 1})
    job = await _lease(te)
    result = await te.dispatch(c.JobExecute(job_id=job.id, worker_id="w"))
    assert result.outcome == "failed"
    assert result.retryable is False
    assert result.error is not None
    assert "OutputValidationError" in result.error
    assert "output.count" in result.error
    stage = await _stage(te, handle.run_id, "bad")
    assert (stage.status, stage.attempt, stage.retryable) == (StageStatus.FAILED, 1, False)
    assert (await te.get_run(handle.run_id)).status is RunStatus.FAILED


async def test_output_is_stored_in_json_form() -> None:
    """A model or an equivalent dict is validated and stored as JSON."""

    @define_stage(id="ok", input=In, output=Out)
    def ok(ctx):  # type: ignore[no-untyped-def]
        return {"text": "t", "count": "3"}

    te = TestEngine([_wf(ok)])
    handle = await te.start("wf", {"n": 1})
    assert await handle.result() == {"text": "t", "count": 3}


async def test_stage_input_mismatch_fails_without_running_body() -> None:
    """Input that does not fit the stage's model fails non-retryably, body not called."""
    calls: list[int] = []

    @define_stage(id="s", input=In, output=Out)
    async def s(ctx):  # type: ignore[no-untyped-def]
        calls.append(1)
        return Out(text="", count=0)

    te = TestEngine([_wf(s, input=dict)])
    handle = await te.start("wf", {"other": 1})
    await te.run_until_idle()
    stage = await _stage(te, handle.run_id, "s")
    assert stage.status is StageStatus.FAILED
    assert stage.error is not None
    assert "input.n" in stage.error
    assert calls == []


async def test_suspend_from_non_batch_stage_is_non_retryable() -> None:
    """Returning Suspend from a plain stage fails it without retrying."""

    @define_stage(id="s", input=In, output=Out)
    async def s(ctx):  # type: ignore[no-untyped-def]
        return Suspend(state={})

    te = TestEngine([_wf(s)])
    handle = await te.start("wf", {"n": 1})
    await te.run_until_idle()
    stage = await _stage(te, handle.run_id, "s")
    assert (stage.status, stage.attempt) == (StageStatus.FAILED, 1)
    assert "define_batch_stage" in (stage.error or "")


async def test_non_retryable_error_fails_at_once() -> None:
    """NonRetryableError from the body fails the stage ignoring the retry policy."""

    @define_stage(id="s", input=In, output=Out, retry=RetryPolicy(max_attempts=9))
    async def s(ctx):  # type: ignore[no-untyped-def]
        raise NonRetryableError("card declined")

    te = TestEngine([_wf(s)])
    handle = await te.start("wf", {"n": 1})
    await te.run_until_idle()
    stage = await _stage(te, handle.run_id, "s")
    assert (stage.status, stage.attempt) == (StageStatus.FAILED, 1)
    [failed] = [e for e in te.events if isinstance(e, StageFailed)]
    assert failed.will_retry is False
    assert failed.retry_at is None


async def test_timeout_fails_the_attempt_retryably() -> None:
    """A body past its timeout fails with StageTimeoutError and is retried."""
    never = asyncio.Event()

    @define_stage(id="s", input=In, output=Out, timeout=0.1, retry=RetryPolicy(max_attempts=2))
    async def s(ctx):  # type: ignore[no-untyped-def]
        if ctx.attempt == 1:
            await never.wait()
        return Out(text="late", count=ctx.attempt)

    te = TestEngine([_wf(s)])
    handle = await te.start("wf", {"n": 1})
    await te.run_until_idle()
    stage = await _stage(te, handle.run_id, "s")
    assert stage.status is StageStatus.PENDING
    assert "StageTimeoutError" in (stage.error or "")
    await te.advance_time(1)
    assert await handle.result() == {"text": "late", "count": 2}


# -- ghosts and the duplicate-completion guard -----------------------------------------


async def test_cancel_during_execute_makes_result_a_ghost() -> None:
    """A run cancelled while its stage body runs: the result is discarded (ghost=True),
    the stage stays CANCELLED, and the body's logs and annotations are dropped."""
    te = TestEngine()

    @define_stage(id="s", input=In, output=Out)
    async def s(ctx):  # type: ignore[no-untyped-def]
        ctx.log("info", "working")
        ctx.annotate({"k": "v"})
        assert await te.cancel(ctx.run_id, reason="stop") is True
        return Out(text="done", count=1)

    te.register(_wf(s))
    handle = await te.start("wf", {"n": 1})
    job = await _lease(te)
    result = await te.dispatch(c.JobExecute(job_id=job.id, worker_id="w"))
    assert result.ghost is True
    assert result.outcome == "completed"
    stage = await _stage(te, handle.run_id, "s")
    assert stage.status is StageStatus.CANCELLED
    assert stage.output is None
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.output is None
    assert run.search_attributes == {}
    assert await te.logs(handle.run_id) == []
    assert te.job_transport.jobs[job.id].status is JobStatus.CANCELLED
    types = [e.type for e in await te.kernel.reads.events(handle.run_id)]  # type: ignore[attr-defined]
    assert "stage:completed" not in types
    assert types[-1] == "workflow:cancelled"


async def test_reaped_execution_cannot_overwrite_committed_result() -> None:
    """A slow execution whose lease was reaped and retaken cannot overwrite the result
    the second execution committed: it comes back as a ghost."""
    entered = asyncio.Event()
    release = asyncio.Event()

    @define_stage(id="s", input=In, output=Out, retry=RetryPolicy(initial_delay=5.0))
    async def s(ctx):  # type: ignore[no-untyped-def]
        if ctx.attempt == 1:
            entered.set()
            await release.wait()
            return Out(text="first", count=1)
        return Out(text="second", count=2)

    te = TestEngine([_wf(s)])
    handle = await te.start("wf", {"n": 1})
    job = await _lease(te, "w1")
    slow = asyncio.create_task(te.dispatch(c.JobExecute(job_id=job.id, worker_id="w1")))
    await entered.wait()
    te.clock.advance(120)
    reaped = await te.dispatch(c.LeaseReapStale(stale_threshold=60))
    assert (reaped.released, reaped.failed) == (1, 0)
    te.clock.advance(5)
    [again] = await te.job_transport.dequeue("w2", te.clock.now())
    assert again.id == job.id
    assert again.attempts == 2
    second = await te.dispatch(c.JobExecute(job_id=job.id, worker_id="w2"))
    assert second.outcome == "completed"
    assert not second.ghost
    release.set()
    first = await slow
    assert first.ghost is True
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.COMPLETED
    assert run.output == {"text": "second", "count": 2}
    await te.run_until_idle()
    completed = [e for e in te.events if e.type == "stage:completed"]  # type: ignore[attr-defined]
    assert len(completed) == 1


async def test_job_not_leased_by_worker_is_a_ghost() -> None:
    """Executing a job this worker does not hold returns a ghost and changes nothing."""

    @define_stage(id="s", input=In, output=Out)
    async def s(ctx):  # type: ignore[no-untyped-def]
        raise AssertionError("must not run")

    te = TestEngine([_wf(s)])
    handle = await te.start("wf", {"n": 1})
    job = await _lease(te, "w1")
    result = await te.dispatch(c.JobExecute(job_id=job.id, worker_id="intruder"))
    assert result.ghost is True
    assert "not leased by 'intruder'" in (result.error or "")
    assert (await _stage(te, handle.run_id, "s")).status is StageStatus.PENDING
    assert te.job_transport.jobs[job.id].status is JobStatus.LEASED


async def test_job_of_terminal_run_is_completed_without_running() -> None:
    """A leased job whose run already ended is closed as a ghost without running."""

    @define_stage(id="s", input=In, output=Out)
    async def s(ctx):  # type: ignore[no-untyped-def]
        raise AssertionError("must not run")

    te = TestEngine([_wf(s)])
    handle = await te.start("wf", {"n": 1})
    job = await _lease(te)
    async with te.persistence.transaction() as tx:  # cancelled without touching the job
        run = await tx.runs.get(handle.run_id)
        assert run is not None
        from treadle.kernel.model import evolve

        await tx.runs.update(evolve(run, {"status": RunStatus.CANCELLED}))
    result = await te.dispatch(c.JobExecute(job_id=job.id, worker_id="w"))
    assert result.ghost is True
    assert "CANCELLED" in (result.error or "")
    assert te.job_transport.jobs[job.id].status is JobStatus.COMPLETED


# -- release after an execution that raises ---------------------------------------------


async def test_job_for_unregistered_workflow_is_released_with_backoff_then_failed() -> None:
    """If the workflow is missing from the registry the job is released with backoff
    (never left LEASED), and failed with its stage once attempts are exhausted."""

    @define_stage(id="s", input=In, output=Out)
    async def s(ctx):  # type: ignore[no-untyped-def]
        return Out(text="", count=0)

    te = TestEngine([_wf(s)])
    handle = await te.start("wf", {"n": 1})
    await te.dispatch(c.RunClaimPending(worker_id="w"))
    te.registry.unregister("wf")
    for attempt in (1, 2):
        [job] = await te.job_transport.dequeue("w", te.clock.now())
        with pytest.raises(WorkflowNotFoundError):
            await te.dispatch(c.JobExecute(job_id=job.id, worker_id="w"))
        stored = te.job_transport.jobs[job.id]
        assert stored.status is JobStatus.QUEUED
        assert stored.attempts == attempt
        assert stored.next_poll_at > te.clock.now()
        assert "WorkflowNotFoundError" in (stored.last_error or "")
        te.clock.set(stored.next_poll_at)
    [job] = await te.job_transport.dequeue("w", te.clock.now())
    with pytest.raises(WorkflowNotFoundError):
        await te.dispatch(c.JobExecute(job_id=job.id, worker_id="w"))
    assert te.job_transport.jobs[job.id].status is JobStatus.FAILED
    stage = await _stage(te, handle.run_id, "s")
    assert stage.status is StageStatus.FAILED
    assert "WorkflowNotFoundError" in (stage.error or "")


async def test_stage_missing_from_registered_version_releases_job() -> None:
    """A job naming a stage the registered workflow lacks is released with backoff, and
    fails its stage and run once attempts are exhausted; never left LEASED."""

    @define_stage(id="old", input=In, output=Out)
    async def old(ctx):  # type: ignore[no-untyped-def]
        return Out(text="", count=0)

    @define_stage(id="new", input=In, output=Out)
    async def new(ctx):  # type: ignore[no-untyped-def]
        return Out(text="", count=0)

    te = TestEngine([_wf(old)])
    await te.start("wf", {"n": 1})
    job = await _lease(te)
    te.registry.unregister("wf")
    te.registry.register(_wf(new))
    for _ in range(2):
        with pytest.raises(StageNotFoundError, match="has no stage 'old'"):
            await te.dispatch(c.JobExecute(job_id=job.id, worker_id="w"))
        stored = te.job_transport.jobs[job.id]
        assert stored.status is JobStatus.QUEUED
        te.clock.set(stored.next_poll_at)
        [job] = await te.job_transport.dequeue("w", te.clock.now())
    with pytest.raises(StageNotFoundError):
        await te.dispatch(c.JobExecute(job_id=job.id, worker_id="w"))
    assert te.job_transport.jobs[job.id].status is JobStatus.FAILED
    run = await te.get_run(job.workflow_run_id)
    assert run.status is RunStatus.FAILED
    assert "StageNotFoundError" in (run.error or "")


async def test_test_engine_recovers_job_when_workflow_comes_back() -> None:
    """Driven by TestEngine, the missing workflow surfaces as an error, the job is left
    QUEUED (not LEASED), and the run completes once the workflow is registered again."""

    @define_stage(id="s", input=In, output=Out)
    async def s(ctx):  # type: ignore[no-untyped-def]
        return Out(text="ok", count=ctx.attempt)

    wf = _wf(s)
    te = TestEngine([wf])
    handle = await te.start("wf", {"n": 1})
    await te.dispatch(c.RunClaimPending(worker_id=te.worker_id))
    te.registry.unregister("wf")
    with pytest.raises(WorkflowNotFoundError):
        await te.run_until_idle()
    assert all(j.status is JobStatus.QUEUED for j in te.job_transport.jobs.values())
    te.register(wf)
    await te.advance_time(60)
    assert await handle.result() == {"text": "ok", "count": 1}


# -- StageContext ------------------------------------------------------------------------


async def test_stage_context_members() -> None:
    """progress emits stage:progress, log is stored, artifacts round-trip, heartbeat
    extends the lease, idempotency_key is stable across retries, attempt increments."""
    seen: list[tuple[int, str, str]] = []

    @define_stage(id="s", input=In, output=Out, retry=RetryPolicy(initial_delay=2.0))
    async def s(ctx):  # type: ignore[no-untyped-def]
        seen.append((ctx.attempt, ctx.idempotency_key, ctx.workflow_id))
        ctx.progress(0.25, "quarter")
        ctx.log("INFO", "attempt", number=ctx.attempt)
        key = await ctx.artifacts.put("out.txt", f"attempt {ctx.attempt}")
        assert key.endswith("/stages/s/artifacts/out.txt")
        assert await ctx.artifacts.get("out.txt") == f"attempt {ctx.attempt}".encode()
        assert await ctx.artifacts.has("out.txt")
        assert await ctx.artifacts.list() == ["out.txt"]
        ctx.heartbeat()
        await asyncio.sleep(0)  # let the heartbeat task run
        assert not ctx.cancelled
        if ctx.attempt == 1:
            raise RuntimeError("first try fails")
        return Out(text="ok", count=ctx.input.n)

    te = TestEngine([_wf(s)])
    handle = await te.start("wf", {"n": 4})
    await te.run_until_idle()
    job = next(iter(te.job_transport.jobs.values()))
    assert job.status is JobStatus.QUEUED
    await te.advance_time(2)
    assert await handle.result() == {"text": "ok", "count": 4}
    assert [a for a, _, _ in seen] == [1, 2]
    assert seen[0][1] == seen[1][1] == f"{handle.run_id}:s"
    assert seen[0][2] == "wf"
    progress = [e for e in te.events if isinstance(e, StageProgress)]
    assert [(p.stage_id, p.fraction, p.message) for p in progress] == [("s", 0.25, "quarter")] * 2
    logs = await te.logs(handle.run_id)
    assert [(r.level, r.message, r.fields, r.stage_id) for r in logs] == [
        ("info", "attempt", {"number": 1}, "s"),
        ("info", "attempt", {"number": 2}, "s"),
    ]
    key = f"runs/{handle.run_id}/stages/s/artifacts/out.txt"
    assert te.blob_store.blobs[key] == b"attempt 2"


async def test_heartbeat_keeps_lease_from_being_reaped() -> None:
    """A stage that heartbeats is not reaped even after the threshold has passed since
    it was leased; one that stopped heartbeating is."""
    entered = asyncio.Event()
    release = asyncio.Event()

    @define_stage(id="s", input=In, output=Out)
    async def s(ctx):  # type: ignore[no-untyped-def]
        te.clock.advance(50)
        ctx.heartbeat()
        entered.set()
        await release.wait()
        return Out(text="", count=0)

    te = TestEngine([_wf(s)])
    handle = await te.start("wf", {"n": 1})
    job = await _lease(te)
    leased_at = te.job_transport.jobs[job.id].heartbeat_at
    task = asyncio.create_task(te.dispatch(c.JobExecute(job_id=job.id, worker_id="w")))
    await entered.wait()
    await asyncio.sleep(0)
    assert te.job_transport.jobs[job.id].heartbeat_at == te.clock.now() != leased_at
    te.clock.advance(20)  # 70 s since leased, 20 s since the heartbeat
    assert (await te.dispatch(c.LeaseReapStale(stale_threshold=60))).released == 0
    release.set()
    assert (await task).outcome == "completed"
    assert (await te.get_run(handle.run_id)).status is RunStatus.COMPLETED


async def test_heartbeat_after_lease_lost_is_harmless() -> None:
    """A heartbeat for a lease already lost does not resurrect the lease."""

    @define_stage(id="s", input=In, output=Out)
    async def s(ctx):  # type: ignore[no-untyped-def]
        async with te.persistence.transaction() as tx:
            await te.job_transport.requeue(tx, job.id, te.clock.now())
        ctx.heartbeat()
        await asyncio.sleep(0)
        return Out(text="", count=0)

    te = TestEngine([_wf(s)])
    await te.start("wf", {"n": 1})
    job = await _lease(te)
    result = await te.dispatch(c.JobExecute(job_id=job.id, worker_id="w"))
    assert result.ghost is True
    assert te.job_transport.jobs[job.id].status is JobStatus.QUEUED


async def test_sync_stage_runs_off_the_event_loop() -> None:
    """A sync stage body runs in a worker thread and may report progress from there."""
    threads: list[threading.Thread] = []

    @define_stage(id="s", input=In, output=Out)
    def s(ctx):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread())
        ctx.progress(1.0)
        return Out(text="sync", count=ctx.input.n)

    te = TestEngine([_wf(s)])
    handle = await te.start("wf", {"n": 2})
    assert await handle.result() == {"text": "sync", "count": 2}
    assert threads
    assert threads[0] is not threading.main_thread()
    assert [e.type for e in te.events].count("stage:progress") == 1  # type: ignore[attr-defined]


async def test_progress_rejects_out_of_range_fraction() -> None:
    """ctx.progress outside [0, 1] raises ValueError inside the body (failing the stage)."""

    @define_stage(id="s", input=In, output=Out, retry=RetryPolicy(max_attempts=1))
    async def s(ctx):  # type: ignore[no-untyped-def]
        ctx.progress(1.5)
        return Out(text="", count=0)

    te = TestEngine([_wf(s)])
    handle = await te.start("wf", {"n": 1})
    await te.run_until_idle()
    assert "ValueError" in ((await _stage(te, handle.run_id, "s")).error or "")


async def test_artifact_names_are_validated_and_other_stages_readable() -> None:
    """Artifact names may not be empty or absolute; another stage's artifact is readable."""

    @define_stage(id="a", input=In, output=In)
    async def a(ctx):  # type: ignore[no-untyped-def]
        for bad in ("", "/etc/passwd"):
            with pytest.raises(ValueError, match="not valid"):
                await ctx.artifacts.put(bad, b"x")
        await ctx.artifacts.put("shared.bin", b"\x00\x01")
        return ctx.input

    @define_stage(id="b", input=In, output=Out)
    async def b(ctx):  # type: ignore[no-untyped-def]
        data = await ctx.artifacts.get("shared.bin", stage_id="a")
        assert await ctx.artifacts.has("shared.bin", stage_id="a")
        assert not await ctx.artifacts.has("shared.bin")
        return Out(text=data.hex(), count=len(data))

    te = TestEngine([WorkflowBuilder("wf", input=In).pipe(a).pipe(b).build()])
    handle = await te.start("wf", {"n": 1})
    assert await handle.result() == {"text": "0001", "count": 2}


async def test_require_missing_output_fails_stage() -> None:
    """ctx.require of a stage without output fails the stage; ctx.optional gives None."""

    class Maybe(BaseModel):
        value: int | None = None

    @define_stage(id="a", input=In, output=Maybe)
    async def a(ctx):  # type: ignore[no-untyped-def]
        return Maybe()

    @define_stage(id="b", input="none", output=Out)
    async def b(ctx):  # type: ignore[no-untyped-def]
        assert ctx.optional("nope") is None
        assert ctx.optional("a").value is None
        ctx.require("nope")
        return Out(text="", count=0)

    te = TestEngine([WorkflowBuilder("wf", input=In).pipe(a).pipe(b).build()])
    handle = await te.start("wf", {"n": 1})
    await te.run_until_idle()
    stage = await _stage(te, handle.run_id, "b")
    assert stage.status is StageStatus.FAILED
    assert "MissingOutputError" in (stage.error or "")
    assert "'nope'" in (stage.error or "")
