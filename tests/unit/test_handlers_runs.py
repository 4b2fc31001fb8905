"""Run lifecycle handlers: run.create, run.claimPending, run.transition, run.cancel,
run.rerunFrom, and the clock/duration/error bookkeeping on runs."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import BaseModel

from treadle import RetryPolicy, WorkflowBuilder, define_stage
from treadle.kernel import commands as c
from treadle.kernel.errors import (
    InvalidConfigError,
    InvalidStateError,
    NotSupportedError,
    StageNotFoundError,
    TransientStorageError,
)
from treadle.kernel.events import WorkflowCompleted, WorkflowFailed
from treadle.kernel.handlers.common import decide
from treadle.kernel.model import JobStatus, Run, RunStatus, StageRun, StageStatus, evolve
from treadle.testing import Chaos, TestEngine


class In(BaseModel):
    n: int


class Out(BaseModel):
    n: int


@define_stage(id="a", input=In, output=Out)
async def a(ctx):  # type: ignore[no-untyped-def]
    return Out(n=ctx.input.n + 1)


@define_stage(id="b", input=Out, output=Out)
async def b(ctx):  # type: ignore[no-untyped-def]
    return Out(n=ctx.input.n * 10)


@define_stage(id="c", input=Out, output=Out)
async def c_stage(ctx):  # type: ignore[no-untyped-def]
    return Out(n=ctx.input.n * 100)


@define_stage(id="boom", input=In, output=Out, retry=RetryPolicy(max_attempts=1))
async def boom(ctx):  # type: ignore[no-untyped-def]
    raise RuntimeError("kaput")


LINEAR = WorkflowBuilder("linear", input=In).pipe(a).pipe(b).build()
PAR = WorkflowBuilder("par", input=In).parallel([a, boom]).build()
FAILING = WorkflowBuilder("failing", input=In).pipe(boom).build()


class ScriptedChaos(Chaos):
    """Fails exactly the commits whose 1-based index (since reset) is listed."""

    def __init__(self) -> None:
        super().__init__(fail_rate=0.0, seed=0)
        self.failing: set[int] = set()
        self.count = 0

    def fail_next(self, *indexes: int) -> None:
        self.count = 0
        self.failing = set(indexes)

    def roll(self) -> bool:
        self.count += 1
        return self.count in self.failing


# -- run.claimPending ---------------------------------------------------------------


async def test_claim_marks_running_and_enqueues_group_zero() -> None:
    """claimPending marks the run RUNNING with started_at and one job per group-0 stage."""
    te = TestEngine([LINEAR])
    handle = await te.start("linear", {"n": 1})
    te.clock.advance(5)
    result = await te.dispatch(c.RunClaimPending(worker_id="w1"))
    [claimed] = result.claimed
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.RUNNING
    assert run.worker_id == "w1"
    assert run.started_at == te.clock.now()
    assert run.current_group == 0
    jobs = list(te.job_transport.jobs.values())
    assert [j.id for j in jobs] == claimed.job_ids
    assert [j.stage_id for j in jobs] == ["a"]
    assert (await te.dispatch(c.RunClaimPending(worker_id="w1"))).claimed == []


async def test_failed_claim_commit_leaves_neither_running_run_nor_job() -> None:
    """The job is enqueued in the claim's transaction: a failed commit leaves the run
    PENDING and no job, and a later claim succeeds."""
    chaos = ScriptedChaos()
    te = TestEngine([LINEAR], chaos=chaos)
    handle = await te.start("linear", {"n": 1})
    chaos.fail_next(1)
    with pytest.raises(TransientStorageError):
        await te.dispatch(c.RunClaimPending(worker_id="w"))
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.PENDING
    assert run.started_at is None
    assert te.job_transport.jobs == {}
    assert [e.type for e in await te.kernel.reads.events(handle.run_id)] == ["workflow:created"]
    # The rolled-back enqueue left no phantom job for the sweep or for cancel to trip on.
    reaped = await te.dispatch(c.RunReapStuck(stuck_threshold=timedelta(0)))
    assert (reaped.transitioned, reaped.failed) == (0, 0)
    assert await te.dispatch(c.LeaseReapStale(stale_threshold=timedelta(0))) == (
        c.LeaseReapStaleResult(released=0)
    )
    await te.dispatch(c.RunClaimPending(worker_id="w"))
    assert len(te.job_transport.jobs) == 1
    assert await te.cancel(handle.run_id) is True
    assert await te.job_transport.dequeue("w", te.clock.now(), limit=10) == []


async def test_claim_skips_runs_of_unknown_workflows() -> None:
    """A PENDING run whose workflow this worker lacks stays PENDING for another worker."""
    te = TestEngine([LINEAR])
    handle = await te.start("linear", {"n": 1})
    te.registry.unregister("linear")
    result = await te.dispatch(c.RunClaimPending(worker_id="w"))
    assert result.claimed == []
    assert (await te.get_run(handle.run_id)).status is RunStatus.PENDING


async def test_claim_order_is_priority_then_fifo() -> None:
    """Higher priority runs are claimed first, equal priorities in creation order."""
    te = TestEngine([LINEAR])
    low = await te.start("linear", {"n": 1}, priority=1)
    mid1 = await te.start("linear", {"n": 1}, priority=5)
    te.clock.advance(1)
    mid2 = await te.start("linear", {"n": 1}, priority=5)
    high = await te.start("linear", {"n": 1}, priority=9)
    order = []
    for _ in range(4):
        [claimed] = (await te.dispatch(c.RunClaimPending(worker_id="w", max_claims=1))).claimed
        order.append(claimed.workflow_run_id)
    assert order == [high.run_id, mid1.run_id, mid2.run_id, low.run_id]


# -- clock, duration and errors -----------------------------------------------------


async def test_timestamps_come_from_the_injected_clock() -> None:
    """Every stored and published timestamp equals a FakeClock time."""
    te = TestEngine([LINEAR])
    t0 = te.clock.now()
    handle = await te.start("linear", {"n": 1})
    te.clock.advance(10)
    t1 = te.clock.now()
    await te.run_until_idle()
    run = await te.get_run(handle.run_id)
    assert run.created_at == t0
    assert run.started_at == t1
    assert run.completed_at == t1
    assert all(s.started_at == t1 and s.completed_at == t1 for s in run.stages)
    assert {e.timestamp for e in te.events} == {t0, t1}
    assert all(e.timestamp.tzinfo is not None for e in te.events)


async def test_run_duration_counts_from_started_at() -> None:
    """workflow:completed.duration == completed_at - started_at, not from created_at."""
    slow_seen: list[int] = []

    @define_stage(id="wait", input=In, output=Out)
    async def wait(ctx):  # type: ignore[no-untyped-def]
        slow_seen.append(1)
        te.clock.advance(7)  # the stage takes 7 virtual seconds
        return Out(n=1)

    te = TestEngine([WorkflowBuilder("dur", input=In).pipe(wait).build()])
    handle = await te.start("dur", {"n": 1})
    te.clock.advance(100)  # queued for 100 s before a worker claims it
    await te.run_until_idle()
    run = await te.get_run(handle.run_id)
    [completed] = [e for e in te.events if isinstance(e, WorkflowCompleted)]
    assert run.completed_at is not None
    assert run.started_at is not None
    assert completed.duration == run.completed_at - run.started_at == timedelta(seconds=7)
    assert run.duration == timedelta(seconds=7)
    assert run.created_at + timedelta(seconds=100) == run.started_at


async def test_failed_run_records_error_naming_stage() -> None:
    """A run that fails records its error on the run, naming the failed stage."""
    te = TestEngine([FAILING])
    handle = await te.start("failing", {"n": 1})
    await te.run_until_idle()
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.FAILED
    assert run.error is not None
    assert "'boom'" in run.error
    assert "kaput" in run.error
    [failed] = [e for e in te.events if isinstance(e, WorkflowFailed)]
    assert failed.stage_id == "boom"
    assert failed.error == run.error
    assert failed.duration == timedelta(0)


# -- run.transition -----------------------------------------------------------------


def _run(status: RunStatus = RunStatus.RUNNING, group: int = 0) -> Run:
    now = TestEngine().clock.now()
    return Run(
        id="r",
        workflow_id="par",
        status=status,
        current_group=group,
        created_at=now,
        updated_at=now,
    )


def _stage(stage_id: str, status: StageStatus, group: int = 0) -> StageRun:
    return StageRun(workflow_run_id="r", stage_id=stage_id, execution_group=group, status=status)


def test_decision_table() -> None:
    """decide(): noop before start or after the end, advanced/completed when the group
    is done, failed for a stage failed for good, suspend when all waiting suspend."""
    two = LINEAR
    done = StageStatus.COMPLETED
    assert decide(two, _run(RunStatus.PENDING), []).action == "noop"
    assert decide(two, _run(RunStatus.COMPLETED), []).action == "noop"
    assert decide(two, _run(group=-1), []).action == "noop"
    advanced = decide(two, _run(), [_stage("a", done), _stage("b", StageStatus.PENDING, 1)])
    assert (advanced.action, advanced.next_group) == ("advanced", 1)
    assert decide(two, _run(group=1), [_stage("a", done), _stage("b", done, 1)]).action == (
        "completed"
    )
    failed = decide(two, _run(), [_stage("a", StageStatus.FAILED)])
    assert failed.action == "failed"
    assert failed.failed_stage is not None
    assert decide(two, _run(), [_stage("a", StageStatus.CANCELLED)]).action == "failed"
    assert decide(two, _run(), [_stage("a", StageStatus.SUSPENDED)]).action == "suspend"
    assert (
        decide(two, _run(RunStatus.SUSPENDED), [_stage("a", StageStatus.SUSPENDED)]).action
        == "noop"
    )
    assert decide(two, _run(), [_stage("a", StageStatus.RUNNING)]).action == "noop"
    assert decide(two, _run(), [_stage("a", StageStatus.SKIPPED)]).action == "advanced"


async def test_transition_noop_while_parallel_sibling_waits_to_retry() -> None:
    """Sibling completed, other stage failed once and waits to retry: transition is a
    noop, the run is neither failed nor advanced."""

    calls = {"n": 0}

    @define_stage(id="flaky", input=In, output=Out, retry=RetryPolicy(initial_delay=30.0))
    async def flaky(ctx):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("once")
        return Out(n=2)

    @define_stage(id="c", input="none", output=Out)
    async def join(ctx):  # type: ignore[no-untyped-def]
        return Out(n=ctx.require("a").n + ctx.require("flaky").n)

    wf = WorkflowBuilder("race", input=In).parallel([a, flaky]).pipe(join).build()
    te = TestEngine([wf])
    handle = await te.start("race", {"n": 1})
    await te.run_until_idle()
    run = await te.get_run(handle.run_id)
    assert {s.stage_id: s.status for s in run.stages} == {
        "a": StageStatus.COMPLETED,
        "flaky": StageStatus.PENDING,
        "c": StageStatus.PENDING,
    }
    result = await te.dispatch(c.RunTransition(workflow_run_id=handle.run_id))
    assert (result.action, result.next_group) == ("noop", None)
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.RUNNING
    assert run.current_group == 0
    await te.advance_time(30)
    assert await handle.result() == {"n": 4}


async def test_transition_command_advances_completes_and_fails() -> None:
    """run.transition applies a missed transition: advanced, then completed; and fails
    a run whose stage failed for good."""
    te = TestEngine([LINEAR])
    handle = await te.start("linear", {"n": 1})
    await te.dispatch(c.RunClaimPending(worker_id="w"))

    async def set_stage(stage_id: str, **changes: object) -> None:
        async with te.persistence.transaction() as tx:
            stage = await tx.stages.get(handle.run_id, stage_id)
            assert stage is not None
            await tx.stages.update(evolve(stage, changes))

    await set_stage("a", status=StageStatus.COMPLETED, output={"n": 2})
    result = await te.dispatch(c.RunTransition(workflow_run_id=handle.run_id))
    assert (result.action, result.next_group) == ("advanced", 1)
    assert [j.stage_id for j in te.job_transport.jobs.values()] == ["a", "b"]
    await set_stage("b", status=StageStatus.COMPLETED, output={"n": 20})
    result = await te.dispatch(c.RunTransition(workflow_run_id=handle.run_id))
    assert result.action == "completed"
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.COMPLETED
    assert run.output == {"n": 20}
    again = await te.dispatch(c.RunTransition(workflow_run_id=handle.run_id))
    assert again.action == "noop"

    other = await te.start("linear", {"n": 1})
    await te.dispatch(c.RunClaimPending(worker_id="w"))
    async with te.persistence.transaction() as tx:
        stage = await tx.stages.get(other.run_id, "a")
        assert stage is not None
        await tx.stages.update(evolve(stage, {"status": StageStatus.FAILED, "error": "bad"}))
    result = await te.dispatch(c.RunTransition(workflow_run_id=other.run_id))
    assert result.action == "failed"
    run = await te.get_run(other.run_id)
    assert run.status is RunStatus.FAILED
    assert run.error == "stage 'a' failed: bad"
    assert {s.stage_id: s.status for s in run.stages}["b"] is StageStatus.CANCELLED
    assert all(
        not j.status.live
        for j in te.job_transport.jobs.values()
        if j.workflow_run_id == other.run_id
    )


# -- run.cancel -----------------------------------------------------------------------


async def test_cancel_is_authoritative() -> None:
    """Cancel marks the run and every non-terminal stage CANCELLED and cancels live jobs;
    completed stages keep their output; a second cancel reports False."""
    te = TestEngine([LINEAR])
    handle = await te.start("linear", {"n": 1})
    await te.dispatch(c.RunClaimPending(worker_id="w"))
    assert await te.cancel(handle.run_id, reason="user asked") is True
    run = await te.get_run(handle.run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.error == "user asked"
    assert run.completed_at == te.clock.now()
    assert {s.status for s in run.stages} == {StageStatus.CANCELLED}
    assert {j.status for j in te.job_transport.jobs.values()} == {JobStatus.CANCELLED}
    assert await te.cancel(handle.run_id) is False
    await te.run_until_idle()
    assert te.event_sink.types(handle.run_id)[-1] == "workflow:cancelled"
    assert te.events[-1].reason == "user asked"  # type: ignore[attr-defined]


# -- run.rerunFrom ----------------------------------------------------------------------


async def test_rerun_from_resets_later_stages_and_their_artifacts() -> None:
    """rerunFrom resets the stage and every later one (outputs and artifacts removed),
    keeps earlier ones, and the run completes again from there."""
    runs: list[str] = []

    def make(stage_id: str, input_model: type[BaseModel], factor: int):  # type: ignore[no-untyped-def]
        @define_stage(id=stage_id, input=input_model, output=Out)
        async def body(ctx):  # type: ignore[no-untyped-def]
            runs.append(stage_id)
            await ctx.artifacts.put("note.txt", f"{stage_id}-{len(runs)}")
            return Out(n=ctx.input.n * factor)

        return body

    wf = (
        WorkflowBuilder("three", input=In)
        .pipe(make("s1", In, 2))
        .pipe(make("s2", Out, 3))
        .pipe(make("s3", Out, 5))
        .build()
    )
    te = TestEngine([wf])
    handle = await te.start("three", {"n": 1})
    assert await handle.result() == {"n": 30}
    blobs_before = dict(te.blob_store.blobs)
    assert len(blobs_before) == 3

    with pytest.raises(StageNotFoundError):
        await te.dispatch(c.RunRerunFrom(workflow_run_id=handle.run_id, from_stage_id="zz"))

    result = await te.dispatch(c.RunRerunFrom(workflow_run_id=handle.run_id, from_stage_id="s2"))
    assert result.deleted_stages == ["s2", "s3"]
    run = await te.get_run(handle.run_id)
    stages = {s.stage_id: s for s in run.stages}
    assert run.status is RunStatus.RUNNING
    assert run.output is None
    assert stages["s1"].status is StageStatus.COMPLETED
    assert stages["s1"].output == {"n": 2}
    assert stages["s2"].output is None
    assert stages["s2"].status is StageStatus.PENDING
    assert stages["s3"].output is None
    assert stages["s3"].attempt == 0
    assert list(te.blob_store.blobs) == [k for k in blobs_before if "/s1/" in k]

    with pytest.raises(InvalidStateError, match="RUNNING"):
        await te.dispatch(c.RunRerunFrom(workflow_run_id=handle.run_id, from_stage_id="s1"))

    assert await handle.result() == {"n": 30}
    assert runs == ["s1", "s2", "s3", "s2", "s3"]
    started = [e for e in te.events if e.type == "workflow:started"]  # type: ignore[attr-defined]
    assert started[-1].rerun_from_stage_id == "s2"  # type: ignore[attr-defined]
    assert te.blob_store.blobs[f"runs/{handle.run_id}/stages/s2/artifacts/note.txt"] == b"s2-4"


async def test_rerun_resets_unfinished_siblings_only() -> None:
    """Rerunning a failed parallel group resets the named stage and failed siblings but
    keeps a sibling that completed."""
    te = TestEngine([PAR])
    handle = await te.start("par", {"n": 1})
    await te.run_until_idle()
    assert (await te.get_run(handle.run_id)).status is RunStatus.FAILED
    te.mock_stage("boom", Out(n=99))
    result = await te.dispatch(c.RunRerunFrom(workflow_run_id=handle.run_id, from_stage_id="boom"))
    assert result.deleted_stages == ["boom"]
    assert await handle.result() == {"a": {"n": 2}, "boom": {"n": 99}}


class Limit(BaseModel):
    most: int = 1


@define_stage(id="first", input=In, output=Out, config=Limit)
async def first(ctx):  # type: ignore[no-untyped-def]
    return Out(n=ctx.input.n)


@define_stage(id="capped", input=Out, output=Out, config=Limit, retry=RetryPolicy(max_attempts=1))
async def capped(ctx):  # type: ignore[no-untyped-def]
    if ctx.input.n > ctx.config.most:
        raise ValueError(f"{ctx.input.n} is over most={ctx.config.most}")
    return Out(n=ctx.input.n)


CAPPED = WorkflowBuilder("capped", input=In).pipe(first).pipe(capped).build()


async def test_rerun_with_config_replaces_reset_stages_config_only() -> None:
    """A run that failed on a bad config re-runs with a corrected one: the reset stage's
    config is replaced (defaults filled), the others keep theirs, and it completes."""
    te = TestEngine([CAPPED])
    handle = await te.start("capped", {"n": 5}, config={"first": {"most": 7}})
    await te.run_until_idle()
    assert (await te.get_run(handle.run_id)).status is RunStatus.FAILED
    await te.dispatch(
        c.RunRerunFrom(
            workflow_run_id=handle.run_id, from_stage_id="capped", config={"capped": {"most": 9}}
        )
    )
    assert await handle.result() == {"n": 5}
    run = await te.get_run(handle.run_id)
    assert run.config == {"first": {"most": 7}, "capped": {"most": 9}}


async def test_rerun_with_a_bad_or_kept_stage_config_writes_nothing() -> None:
    """An invalid value names config.<stage>.<field>; config for a stage the rerun keeps
    names that stage; either way the run stays as it was."""
    te = TestEngine([CAPPED])
    handle = await te.start("capped", {"n": 5})
    await te.run_until_idle()
    before = await te.get_run(handle.run_id)
    assert before.status is RunStatus.FAILED
    for config, field in (
        ({"capped": {"most": "many"}}, "config.capped.most"),
        ({"first": {"most": 9}}, "config.first"),
        ({"nope": {}}, "config.nope"),
    ):
        with pytest.raises(InvalidConfigError) as info:
            await te.dispatch(
                c.RunRerunFrom(workflow_run_id=handle.run_id, from_stage_id="capped", config=config)
            )
        assert next(path for path, _ in info.value.errors).startswith(field), info.value.errors
    after = await te.get_run(handle.run_id)
    assert after.status is RunStatus.FAILED
    assert after.config == before.config
    assert after.stages == before.stages


async def test_rerun_of_a_code_workflow_points_to_fork() -> None:
    """run.rerunFrom on a code workflow is NotSupportedError naming the fork alternative."""
    from treadle import WorkflowContext, workflow

    @workflow(id="coded", input=In, output=Out)
    async def coded(ctx: WorkflowContext, req: In) -> Out:
        return Out(n=req.n)

    te = TestEngine([coded])
    handle = await te.start("coded", {"n": 1})
    assert await handle.result() == {"n": 1}
    with pytest.raises(NotSupportedError, match=r"fork.*treadle fork"):
        await te.dispatch(c.RunRerunFrom(workflow_run_id=handle.run_id, from_stage_id="workflow"))
