"""Command idempotency: scoped by (key, command type), replay returns the cached result,
in-progress keys are refused until reclaimed after ten minutes."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import pytest
from pydantic import BaseModel

from treadle import WorkflowBuilder, define_stage
from treadle.kernel import commands as c
from treadle.kernel.errors import (
    IdempotencyInProgressError,
    JobNotFoundError,
    TransientStorageError,
)
from treadle.kernel.model import IdempotencyRecord, IdempotencyState, JobStatus, StageStatus
from treadle.testing import Chaos, TestEngine


class In(BaseModel):
    n: int


class Out(BaseModel):
    n: int


@define_stage(id="echo", input=In, output=Out)
async def echo(ctx):  # type: ignore[no-untyped-def]
    return Out(n=ctx.input.n)


WF = WorkflowBuilder("echo-wf", input=In).pipe(echo).build()


async def test_run_create_replay_returns_cached_result() -> None:
    """The same run.create key returns the first result and creates one run only; the
    replay says ``created=False`` (it created nothing), as it does when the cache is gone."""
    te = TestEngine([WF])
    first = await te.dispatch(
        c.RunCreate(workflow_id="echo-wf", input={"n": 1}, idempotency_key="k")
    )
    again = await te.dispatch(
        c.RunCreate(workflow_id="echo-wf", input={"n": 2}, idempotency_key="k")
    )
    assert first.created is True
    assert again == first.model_copy(update={"created": False})
    assert len(te.persistence.runs) == 1


async def test_run_create_key_found_on_run_when_cache_missing() -> None:
    """With the cached result gone, the run's own idempotency key still finds it."""
    te = TestEngine([WF])
    first = await te.dispatch(
        c.RunCreate(workflow_id="echo-wf", input={"n": 1}, idempotency_key="k")
    )
    te.persistence.idempotency.clear()
    again = await te.dispatch(
        c.RunCreate(workflow_id="echo-wf", input={"n": 1}, idempotency_key="k")
    )
    assert again.workflow_run_id == first.workflow_run_id
    assert again.created is False
    assert len(te.persistence.runs) == 1


async def test_run_create_keys_are_per_workflow() -> None:
    """The same idempotency key on two workflows starts two runs (a run's key is unique
    per workflow): the first workflow's cached result does not answer the second's, and
    each replay returns its own workflow's run."""
    other = WorkflowBuilder("other-wf", input=In).pipe(echo).build()
    te = TestEngine([WF, other])
    first = await te.dispatch(
        c.RunCreate(workflow_id="echo-wf", input={"n": 1}, idempotency_key="order-1")
    )
    second = await te.dispatch(
        c.RunCreate(workflow_id="other-wf", input={"n": 1}, idempotency_key="order-1")
    )
    assert second.workflow_run_id != first.workflow_run_id
    assert second.created is True
    assert {r.workflow_id for r in te.persistence.runs.values()} == {"echo-wf", "other-wf"}
    for workflow_id, expected in (("echo-wf", first), ("other-wf", second)):
        again = await te.dispatch(
            c.RunCreate(workflow_id=workflow_id, input={"n": 1}, idempotency_key="order-1")
        )
        assert again.workflow_run_id == expected.workflow_run_id


def _reuse_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "run.idempotency_key_reused" in r.getMessage()
    ]


@pytest.mark.parametrize("cache", ["cached", "cache-cleared"])
async def test_key_reused_with_another_input_warns_naming_the_key(
    caplog: pytest.LogCaptureFixture, cache: str
) -> None:
    """Starting again with the same key but a different input still returns the first
    run (documented), and logs a warning that names the key and the run, whether the
    replay is answered from the command cache or from the run's own key. The same input
    again logs nothing."""
    te = TestEngine([WF])
    first = await te.start("echo-wf", {"n": 1}, idempotency_key="order-123")
    if cache == "cache-cleared":
        te.persistence.idempotency.clear()
    with caplog.at_level(logging.WARNING, logger="treadle"):
        same = await te.start("echo-wf", {"n": 1}, idempotency_key="order-123")
        assert _reuse_warnings(caplog) == []
        other = await te.start("echo-wf", {"n": 2}, idempotency_key="order-123")
    assert same.run_id == other.run_id == first.run_id
    assert len(te.persistence.runs) == 1
    [warning] = _reuse_warnings(caplog)
    assert "order-123" in warning
    assert first.run_id in warning
    assert "different input" in warning


async def test_key_reused_in_start_many_with_another_input_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``run.createMany`` warns the same way for an item whose key names a stored run
    with another input."""
    te = TestEngine([WF])
    await te.start("echo-wf", {"n": 1}, idempotency_key="batch-key")
    with caplog.at_level(logging.WARNING, logger="treadle"):
        await te.dispatch(
            c.RunCreateMany(
                items=[
                    c.RunCreateItem(
                        workflow_id="echo-wf", input={"n": 5}, idempotency_key="batch-key"
                    )
                ]
            )
        )
    [warning] = _reuse_warnings(caplog)
    assert "batch-key" in warning


async def test_keys_are_scoped_by_command_type() -> None:
    """One key used by two command types caches two independent results."""
    te = TestEngine([WF])
    handle = await te.start("echo-wf", {"n": 1})
    claim = await te.dispatch(c.RunClaimPending(worker_id="w", idempotency_key="same"))
    cancel = await te.dispatch(c.RunCancel(workflow_run_id=handle.run_id, idempotency_key="same"))
    assert len(claim.claimed) == 1
    assert cancel.cancelled is True
    assert set(te.persistence.idempotency) == {
        ("same", "run.claimPending"),
        ("same", "run.cancel"),
    }
    # Replays return the cached results even though the state has moved on.
    again = await te.dispatch(c.RunCancel(workflow_run_id=handle.run_id, idempotency_key="same"))
    assert again.cancelled is True
    claim_again = await te.dispatch(c.RunClaimPending(worker_id="w", idempotency_key="same"))
    assert claim_again == claim


async def test_in_progress_key_refused_then_reclaimed_after_ten_minutes() -> None:
    """An IN_PROGRESS key raises IdempotencyInProgressError until 10 minutes have passed."""
    te = TestEngine([WF])
    await te.start("echo-wf", {"n": 1})
    async with te.persistence.transaction() as tx:
        await tx.idempotency.put(
            IdempotencyRecord(
                key="busy",
                command_type="stage.pollSuspended",
                state=IdempotencyState.IN_PROGRESS,
                started_at=te.clock.now(),
            )
        )
    cmd = c.StagePollSuspended(idempotency_key="busy")
    with pytest.raises(IdempotencyInProgressError, match="busy"):
        await te.dispatch(cmd)
    te.clock.advance(timedelta(minutes=9, seconds=59))
    with pytest.raises(IdempotencyInProgressError):
        await te.dispatch(cmd)
    te.clock.advance(timedelta(seconds=1))
    result = await te.dispatch(cmd)
    assert result.checked == 0
    record = te.persistence.idempotency_record("busy", "stage.pollSuspended")
    assert record is not None
    assert record.state is IdempotencyState.COMPLETED


async def test_concurrent_execution_of_same_key_is_refused() -> None:
    """While a keyed job.execute runs its body, the same key is refused as in progress."""
    release = asyncio.Event()
    entered = asyncio.Event()

    @define_stage(id="slow", input=In, output=Out)
    async def slow(ctx):  # type: ignore[no-untyped-def]
        entered.set()
        await release.wait()
        return Out(n=ctx.input.n)

    te = TestEngine([WorkflowBuilder("slow-wf", input=In).pipe(slow).build()])
    await te.start("slow-wf", {"n": 5})
    await te.dispatch(c.RunClaimPending(worker_id="w"))
    [job] = await te.job_transport.dequeue("w", te.clock.now())
    cmd = c.JobExecute(job_id=job.id, worker_id="w", idempotency_key="exec-1")
    task = asyncio.create_task(te.dispatch(cmd))
    await entered.wait()
    with pytest.raises(IdempotencyInProgressError):
        await te.dispatch(cmd)
    release.set()
    first = await task
    assert first.outcome == "completed"
    assert await te.dispatch(cmd) == first  # replay: cached, body not run again


class ScriptedChaos(Chaos):
    """Fails exactly the commits whose 1-based index is listed."""

    def __init__(self, failing: set[int]) -> None:
        super().__init__(fail_rate=0.0, seed=0)
        self.failing = failing
        self.count = 0

    def roll(self) -> bool:
        self.count += 1
        return self.count in self.failing


async def test_failed_handler_abandons_in_progress_mark() -> None:
    """A keyed job.execute whose result commit fails drops its in-progress mark (so a
    retry is not refused for ten minutes) and releases the job with backoff."""
    chaos = ScriptedChaos(set())
    te = TestEngine([WF], chaos=chaos)
    await te.start("echo-wf", {"n": 1})
    await te.dispatch(c.RunClaimPending(worker_id="w"))
    [job] = await te.job_transport.dequeue("w", te.clock.now())
    chaos.count = 0
    chaos.failing = {2}  # phase 1 commits, the result commit fails
    cmd = c.JobExecute(job_id=job.id, worker_id="w", idempotency_key="k1")
    with pytest.raises(TransientStorageError):
        await te.dispatch(cmd)
    assert ("k1", "job.execute") not in te.persistence.idempotency
    requeued = te.job_transport.jobs[job.id]
    assert requeued.status is JobStatus.QUEUED
    assert requeued.next_poll_at > te.clock.now()
    stage = (await te.get_run(job.workflow_run_id)).stages[0]
    assert stage.status is StageStatus.PENDING
    assert stage.output is None


async def test_unknown_job_raises_not_found() -> None:
    """job.execute for a job id that does not exist raises JobNotFoundError."""
    te = TestEngine([WF])
    with pytest.raises(JobNotFoundError, match="missing-job"):
        await te.dispatch(c.JobExecute(job_id="missing-job", worker_id="w", idempotency_key="k"))
    assert ("k", "job.execute") not in te.persistence.idempotency


@define_stage(id="first", input=In, output=In)
async def first(ctx):  # type: ignore[no-untyped-def]
    return ctx.input


@define_stage(id="second", input=In, output=In)
async def second(ctx):  # type: ignore[no-untyped-def]
    return ctx.input


@define_stage(id="third", input=In, output=Out)
async def third(ctx):  # type: ignore[no-untyped-def]
    return Out(n=ctx.input.n + 1)


@pytest.mark.parametrize("chain", [True, False])
async def test_test_engine_keys_job_execute_as_the_worker_does(chain: bool) -> None:
    """Like the worker's ``execute_job``: a job taken from the queue is executed under its
    per-attempt key (one ``job.execute`` record), a job handed over by a chained commit
    without one, since nothing else can deliver it."""
    wf = WorkflowBuilder("three", input=In).pipe(first).pipe(second).pipe(third).build()
    te = TestEngine([wf], chain=chain)
    handle = await te.start("three", {"n": 1})
    assert await handle.result() == {"n": 2}
    recorded = sorted(key for key, kind in te.persistence.idempotency if kind == "job.execute")
    jobs = {job.stage_id: job for job in te.job_transport.jobs.values()}
    keyed = ["first"] if chain else ["first", "second", "third"]
    assert recorded == sorted(f"job:{jobs[s].id}:{jobs[s].attempts}" for s in keyed)
