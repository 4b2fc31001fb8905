"""Remote stages: ``define_stage(remote=True)`` runs only through ``job.begin`` and
``job.complete`` / ``job.fail`` / ``job.suspend`` (the phases of ``job.execute`` as
commands), never in an in-process worker; leases, retries and the ghost rule are the
in-process worker's own."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import (
    DefinitionError,
    Engine,
    RunStatus,
    StageContext,
    StageStatus,
    WorkflowBuilder,
    define_stage,
)
from treadle.kernel import commands as c
from treadle.kernel.errors import NotSupportedError
from treadle.kernel.kernel import Kernel
from treadle.kernel.model import Job
from treadle.kernel.retry import RetryPolicy
from treadle.runtime.worker import Worker
from treadle.testing import TestEngine
from treadle.tests.scenario.helpers import until, until_status, worker


class Text(BaseModel):
    text: str


class Words(BaseModel):
    words: list[str]
    lang: str = "en"


class Conf(BaseModel):
    lang: str = "fr"


@define_stage(id="split", input=Text, output=Words)
async def split(ctx: StageContext[Text, None]) -> Words:
    return Words(words=ctx.input.text.split())


@define_stage(
    id="translate",
    input=Words,
    output=Words,
    config=Conf,
    remote=True,
    retry=RetryPolicy(max_attempts=2, initial_delay=5.0),
)
def translate(ctx: StageContext[Words, Conf]) -> Words:
    raise AssertionError("a remote stage's function is never called")


@define_stage(id="join", input=Words, output=Text)
async def join(ctx: StageContext[Words, None]) -> Text:
    return Text(text=f"{ctx.input.lang}:" + " ".join(ctx.input.words))


PIPELINE = WorkflowBuilder("remote-pipeline", input=Text).pipe(split).pipe(translate).pipe(join)
WF = PIPELINE.build()
W = "remote:w1"


async def lease(kernel: Kernel, worker_id: str = W) -> Job | None:
    jobs = await kernel.deps.job_transport.dequeue(
        worker_id, kernel.deps.clock.now(), limit=1, stage_ids=["translate"]
    )
    return jobs[0] if jobs else None


async def begin(kernel: Kernel, worker_id: str = W) -> c.JobBeginResult:
    job = await lease(kernel, worker_id)
    assert job is not None, "no remote job to lease"
    return await kernel.dispatch(c.JobBegin(job_id=job.id, worker_id=worker_id))


async def test_a_remote_stage_waits_for_a_remote_worker_and_its_output_flows_on() -> None:
    """The harness runs the local stages and leaves the remote one queued; ``job.begin``
    hands out the validated input and config (defaults applied), ``job.complete`` commits
    the output and the run goes on to its last stage."""
    te = TestEngine([WF])
    handle = await te.start("remote-pipeline", {"text": "hello world"})
    await te.run_until_idle()
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.RUNNING
    assert [s.status for s in run.stages] == [
        StageStatus.COMPLETED,
        StageStatus.PENDING,
        StageStatus.PENDING,
    ]
    assert run.stages[1].job_id is None
    begun = await begin(te.kernel)
    assert begun.started
    assert begun.input == {"words": ["hello", "world"], "lang": "en"}
    assert begun.config == {"lang": "fr"}
    assert (begun.attempt, begun.stage_attempt) == (1, 1)
    assert begun.idempotency_key == f"{handle.run_id}:translate"
    done = await te.kernel.dispatch(
        c.JobComplete(
            job_id=begun.job_id,
            worker_id=W,
            attempt=begun.attempt,
            output={"words": ["bonjour", "monde"], "lang": "fr"},
        )
    )
    assert (done.outcome, done.ghost) == ("completed", False)
    assert await handle.result() == {"text": "fr:bonjour monde"}
    types = [e.type for e in te.events if getattr(e, "stage_id", None) == "translate"]
    assert types == ["stage:started", "stage:completed"]


async def test_a_wrong_output_fails_the_stage_without_retry() -> None:
    """Output that does not match the stage's model fails it for good, naming the field,
    exactly as a local stage returning the wrong shape."""
    te = TestEngine([WF])
    handle = await te.start("remote-pipeline", {"text": "a"})
    await te.run_until_idle()
    begun = await begin(te.kernel)
    done = await te.kernel.dispatch(
        c.JobComplete(job_id=begun.job_id, worker_id=W, attempt=1, output={"words": "x"})
    )
    assert done.outcome == "failed"
    assert not done.retryable
    assert "output.words" in (done.error or "")
    await te.run_until_idle()
    assert (await te.get_run(handle.run_id)).status is RunStatus.FAILED


async def test_a_failure_retries_under_the_stage_policy_then_fails_the_run() -> None:
    """``job.fail`` requeues the job with the policy's backoff; the next lease is attempt 2;
    a failure at ``max_attempts`` fails the run with the worker's message."""
    te = TestEngine([WF])
    handle = await te.start("remote-pipeline", {"text": "a"})
    await te.run_until_idle()
    begun = await begin(te.kernel)
    failed = await te.kernel.dispatch(
        c.JobFail(job_id=begun.job_id, worker_id=W, attempt=1, error="boom", error_type="TypeError")
    )
    assert (failed.outcome, failed.retryable) == ("failed", True)
    assert failed.error == "RemoteStageError: TypeError: boom"
    assert await lease(te.kernel) is None  # backing off
    await te.advance_time(timedelta(seconds=6))
    again = await begin(te.kernel)
    assert (again.attempt, again.stage_attempt) == (2, 2)
    last = await te.kernel.dispatch(
        c.JobFail(job_id=again.job_id, worker_id=W, attempt=2, error="boom again")
    )
    assert (last.outcome, last.retryable) == ("failed", False)
    await te.run_until_idle()
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert "boom again" in (run.error or "")


async def test_a_non_retryable_failure_fails_at_once() -> None:
    """``retryable=False`` fails the stage on its first attempt, as ``NonRetryableError``."""
    te = TestEngine([WF])
    handle = await te.start("remote-pipeline", {"text": "a"})
    await te.run_until_idle()
    begun = await begin(te.kernel)
    failed = await te.kernel.dispatch(
        c.JobFail(job_id=begun.job_id, worker_id=W, attempt=1, error="bad", retryable=False)
    )
    assert not failed.retryable
    await te.run_until_idle()
    assert (await te.get_run(handle.run_id)).status is RunStatus.FAILED


async def test_complete_after_cancel_is_a_ghost() -> None:
    """A run cancelled while its remote stage runs stays cancelled: the late output is
    discarded and reported ``ghost=True``; the heartbeat says the run was cancelled."""
    te = TestEngine([WF])
    handle = await te.start("remote-pipeline", {"text": "a"})
    await te.run_until_idle()
    begun = await begin(te.kernel)
    await te.cancel(handle.run_id, reason="no longer needed")
    beat = await te.kernel.dispatch(
        c.JobHeartbeat(job_id=begun.job_id, worker_id=W, attempt=begun.attempt)
    )
    assert (beat.held, beat.cancelled) == (False, True)
    done = await te.kernel.dispatch(
        c.JobComplete(job_id=begun.job_id, worker_id=W, attempt=1, output={"words": ["x"]})
    )
    assert done.ghost
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.stages[1].output is None


async def test_an_outcome_for_an_expired_lease_is_a_ghost_and_the_new_lease_commits() -> None:
    """A worker that went silent loses its lease to ``lease.reapStale``; the job is leased
    again (attempt 2) and only the new lease's outcome counts."""
    te = TestEngine([WF])
    handle = await te.start("remote-pipeline", {"text": "a b"})
    await te.run_until_idle()
    first = await begin(te.kernel, "remote:slow")
    beat = await te.kernel.dispatch(
        c.JobHeartbeat(job_id=first.job_id, worker_id="remote:slow", attempt=1)
    )
    assert beat.held
    assert not beat.cancelled
    te.clock.advance(timedelta(seconds=120))
    reaped = await te.kernel.dispatch(c.LeaseReapStale(stale_threshold=timedelta(seconds=60)))
    assert reaped.released == 1
    await te.advance_time(timedelta(seconds=10))  # past the retry backoff
    second = await begin(te.kernel, "remote:fast")
    assert (second.job_id, second.attempt) == (first.job_id, 2)
    late = await te.kernel.dispatch(
        c.JobComplete(job_id=first.job_id, worker_id="remote:slow", attempt=1, output=first.input)
    )
    assert late.ghost
    done = await te.kernel.dispatch(
        c.JobComplete(job_id=second.job_id, worker_id="remote:fast", attempt=2, output=first.input)
    )
    assert not done.ghost
    assert await handle.result() == {"text": "en:a b"}


async def test_a_replayed_complete_returns_the_first_result() -> None:
    """A worker retrying a ``job.complete`` whose reply it lost, under the same key, gets
    the recorded result, not a ghost."""
    te = TestEngine([WF])
    await te.start("remote-pipeline", {"text": "a"})
    await te.run_until_idle()
    begun = await begin(te.kernel)
    cmd = c.JobComplete(
        job_id=begun.job_id, worker_id=W, attempt=1, output={"words": ["z"]}, idempotency_key="k1"
    )
    first = await te.kernel.dispatch(cmd)
    again = await te.kernel.dispatch(cmd)
    assert first == again
    assert not again.ghost


async def test_suspend_leases_the_stage_again_with_its_state() -> None:
    """``job.suspend`` parks the stage; at its poll interval the job is leased again and
    ``job.begin`` hands back the saved state as ``resume_state``."""
    te = TestEngine([WF])
    handle = await te.start("remote-pipeline", {"text": "a"})
    await te.run_until_idle()
    begun = await begin(te.kernel)
    parked = await te.kernel.dispatch(
        c.JobSuspend(
            job_id=begun.job_id, worker_id=W, attempt=1, state={"ticket": 7}, poll_interval=30
        )
    )
    assert parked.outcome == "suspended"
    assert (await te.get_run(handle.run_id)).stages[1].status is StageStatus.SUSPENDED
    assert await lease(te.kernel) is None
    await te.advance_time(timedelta(seconds=31))
    resumed = await begin(te.kernel)
    assert resumed.resume_state == {"ticket": 7}
    await te.kernel.dispatch(
        c.JobComplete(
            job_id=resumed.job_id, worker_id=W, attempt=resumed.attempt, output={"words": ["y"]}
        )
    )
    assert await handle.result() == {"text": "en:y"}


async def test_a_mocked_remote_stage_runs_in_the_harness() -> None:
    """``mock_stage`` stands in for the remote worker: the harness runs the mock."""
    te = TestEngine([WF])
    te.mock_stage("translate", lambda ctx: Words(words=["m"], lang="xx"))
    assert await (await te.start("remote-pipeline", {"text": "a"})).result() == {"text": "xx:m"}


async def test_local_execution_and_remote_begin_refuse_the_wrong_kind_of_stage() -> None:
    """``job.execute`` refuses a remote stage and ``job.begin`` a local one (a wrongly
    routed lease is released, never run by the wrong executor)."""
    te = TestEngine([WF])
    await te.start("remote-pipeline", {"text": "a"})
    await te.run_until_idle()
    job = await lease(te.kernel, "local")
    assert job is not None
    with pytest.raises(NotSupportedError, match="is remote"):
        await te.kernel.dispatch(c.JobExecute(job_id=job.id, worker_id="local"))
    te2 = TestEngine([WF])
    await te2.start("remote-pipeline", {"text": "a"})
    await te2.kernel.dispatch(c.RunClaimPending(worker_id="r"))
    jobs = await te2.job_transport.dequeue("r", te2.clock.now(), limit=1)
    with pytest.raises(NotSupportedError, match="not remote"):
        await te2.kernel.dispatch(c.JobBegin(job_id=jobs[0].id, worker_id="r"))


def test_remote_queue_rules() -> None:
    """A remote stage defaults to the ``remote`` queue; a queue may not mix remote and
    in-process stages; an in-process worker refuses to serve a queue of remote stages."""
    assert WF.queue_of("translate") == "remote"
    assert WF.remote_queues == ("remote",)

    @define_stage(id="r2", input=Words, output=Words, remote=True, queue="default")
    def r2(ctx: Any) -> Words:
        raise AssertionError

    with pytest.raises(DefinitionError, match="queue 'default' holds remote stage 'r2'"):
        WorkflowBuilder("mixed", input=Text).pipe(split).pipe(r2).build()
    te = TestEngine([WF])
    with pytest.raises(DefinitionError, match="queue 'remote' holds remote stages"):
        Worker(te.kernel, queues=["default", "remote"])


async def test_remote_stage_on_sql(treadle_database_url: str) -> None:
    """On SQLite and PostgreSQL: an in-process worker runs the local stages and leaves the
    remote one; begin and complete commit it; a second pipeline's cancel makes its remote
    result a ghost."""
    engine = await Engine.open(treadle_database_url, workflows=[WF])
    async with engine, worker(engine):
        handle = await engine.start("remote-pipeline", {"text": "x y"})
        ghost_run = await engine.start("remote-pipeline", {"text": "g"})
        kernel = engine.kernel
        found: list[Job] = []

        async def leased_both() -> bool:
            job = await lease(kernel)
            if job is not None:
                found.append(job)
            return len(found) == 2

        await until(leased_both)
        by_run = {job.workflow_run_id: job for job in found}
        begun = await kernel.dispatch(c.JobBegin(job_id=by_run[handle.run_id].id, worker_id=W))
        other = await kernel.dispatch(c.JobBegin(job_id=by_run[ghost_run.run_id].id, worker_id=W))
        assert begun.input == {"words": ["x", "y"], "lang": "en"}
        await engine.cancel(ghost_run.run_id)
        ghost = await kernel.dispatch(
            c.JobComplete(job_id=other.job_id, worker_id=W, attempt=1, output=other.input)
        )
        assert ghost.ghost
        done = await kernel.dispatch(
            c.JobComplete(job_id=begun.job_id, worker_id=W, attempt=1, output={"words": ["u"]})
        )
        assert not done.ghost
        assert await handle.result(timeout=20) == {"text": "en:u"}
        await until_status(engine, ghost_run.run_id, RunStatus.CANCELLED)
        # The worker's commit of "split" asked to chain the next stage, which is remote:
        # nothing was chained, and its own events are recorded all the same.
        kinds = [(e.type, getattr(e, "stage_id", None)) async for e in engine.events(handle.run_id)]
        assert [k for k in kinds if k[0] == "stage:completed"] == [
            ("stage:completed", "split"),
            ("stage:completed", "translate"),
            ("stage:completed", "join"),
        ]


@define_stage(id="left", input=Words, output=Words, remote=True)
def left(ctx: StageContext[Words, None]) -> Words:
    raise AssertionError


@define_stage(id="right", input=Words, output=Words, remote=True)
def right(ctx: StageContext[Words, None]) -> Words:
    raise AssertionError


@define_stage(id="merge", input="none", output=Text)
async def merge(ctx: StageContext[None, None]) -> Text:
    both = ctx.require("left").words + ctx.require("right").words
    return Text(text=" ".join(both))


FORK = WorkflowBuilder("remote-fork", input=Text).pipe(split).parallel([left, right]).pipe(merge)


async def test_a_parallel_group_of_remote_stages_completed_at_once(
    treadle_database_url: str,
) -> None:
    """Two remote stages of one parallel group completed concurrently (a group commit, or
    two commits racing for the run): exactly one of them advances the run, which ends
    with both outputs."""
    wf = FORK.build()
    engine = await Engine.open(treadle_database_url, workflows=[wf])
    async with engine, worker(engine):
        handle = await engine.start("remote-fork", {"text": "p q"})
        kernel = engine.kernel
        jobs: list[Job] = []

        async def both_queued() -> bool:
            jobs.extend(
                await kernel.deps.job_transport.dequeue(
                    W, kernel.deps.clock.now(), limit=2, stage_ids=["left", "right"]
                )
            )
            return len(jobs) == 2

        await until(both_queued)
        begun = [await kernel.dispatch(c.JobBegin(job_id=j.id, worker_id=W)) for j in jobs]
        results = await asyncio.gather(
            *(
                kernel.dispatch(
                    c.JobComplete(
                        job_id=b.job_id,
                        worker_id=W,
                        attempt=b.attempt,
                        output={"words": [f"{b.stage_id}!"]},
                    )
                )
                for b in begun
            )
        )
        assert [r.ghost for r in results] == [False, False]
        assert await handle.result(timeout=20) == {"text": "left! right!"}


async def test_a_paused_run_holds_its_remote_stage_until_resumed() -> None:
    """Pausing a run holds its queued remote job (nothing to lease); a job leased just
    before the pause is not started by ``job.begin`` (``started=False``, held with its
    attempt given back); after ``resume`` it is leased and started as attempt 1."""
    te = TestEngine([WF])
    handle = await te.start("remote-pipeline", {"text": "a"})
    await te.run_until_idle()
    await te.kernel.dispatch(c.RunPause(workflow_run_id=handle.run_id))
    assert await lease(te.kernel) is None
    await te.kernel.dispatch(c.RunResume(workflow_run_id=handle.run_id))
    job = await lease(te.kernel)
    assert job is not None
    await te.kernel.dispatch(c.RunPause(workflow_run_id=handle.run_id))
    held = await te.kernel.dispatch(c.JobBegin(job_id=job.id, worker_id=W))
    assert not held.started
    assert "paused" in (held.reason or "")
    await te.kernel.dispatch(c.RunResume(workflow_run_id=handle.run_id))
    again = await begin(te.kernel)
    assert again.started
    assert again.attempt == 1
