"""The read-free result commit (``jobs._commit_trusted``): a completed stage's commit
writes what its execution knows of the job, run and stages without reading them back,
each write guarded by the version it replaces. Whatever moved the run or the stage on
while the body ran makes a guard fail, and the commit falls back to the reading path,
which decides as it always did: a ghost when the stage was taken away, a normal commit
when only the run changed. On memory, a SQLite file and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel
from sqlalchemy import event

from treadle import Engine, WorkflowBuilder, define_stage
from treadle.kernel import commands as c
from treadle.kernel.model import Job, JobStatus, RunStatus, StageStatus
from treadle.testing import FakeClock

HOLD: dict[str, asyncio.Event] = {}
ENTERED: dict[str, asyncio.Event] = {}


class Num(BaseModel):
    n: int


def _step(stage_id: str) -> Any:
    @define_stage(id=stage_id, input=Num, output=Num)
    async def step(ctx):  # type: ignore[no-untyped-def]
        if stage_id in ENTERED:
            ENTERED[stage_id].set()
        if stage_id in HOLD:
            await HOLD[stage_id].wait()
        return Num(n=ctx.input.n + 1)

    return step


SEQ = WorkflowBuilder("seq", input=Num).pipe(_step("a")).pipe(_step("b")).pipe(_step("c")).build()
WORKFLOWS = [SEQ]


async def _chained_b(engine: Engine) -> tuple[str, Job]:
    """A run whose stage ``a`` committed and chained ``b`` to worker w1 (the hand-off
    held by this kernel): ``b``'s execution starts from what that commit wrote."""
    handle = await engine.start("seq", {"n": 1})
    await engine.kernel.dispatch(c.RunClaimPending(worker_id="w1"))
    assert engine.backend is not None
    (job,) = await engine.backend.job_transport.dequeue("w1", engine.kernel.deps.clock.now())
    first = await engine.kernel.dispatch(c.JobExecute(job_id=job.id, worker_id="w1", chain=True))
    assert first.chained_job is not None
    return handle.run_id, first.chained_job


async def _while_b_runs(engine: Engine, chained: Job, meanwhile: Any) -> c.JobExecuteResult:
    """Execute ``b``, doing ``meanwhile()`` while its body runs."""
    HOLD["b"], ENTERED["b"] = asyncio.Event(), asyncio.Event()
    execution = asyncio.create_task(
        engine.kernel.dispatch(c.JobExecute(job_id=chained.id, worker_id="w1", chain=True))
    )
    await ENTERED["b"].wait()
    await meanwhile()
    HOLD["b"].set()
    return await execution


async def test_a_lease_reaped_while_the_body_ran_makes_the_result_a_ghost(
    engine: Engine, clock: FakeClock
) -> None:
    """The job's lease expired and was reaped during the body (stage back to PENDING,
    job requeued), leaving the run as it was: the stage's version guard refuses the
    read-free commit, and the reading path discards the result."""
    run_id, chained = await _chained_b(engine)

    async def reap() -> None:
        clock.advance(120)
        reaped = await engine.kernel.dispatch(c.LeaseReapStale(stale_threshold=60))
        assert reaped.released == 1

    result = await _while_b_runs(engine, chained, reap)
    assert result.ghost
    assert result.chained_job is None
    run = await engine.get_run(run_id)
    assert run.status is RunStatus.RUNNING
    b = next(s for s in run.stages if s.stage_id == "b")
    assert (b.status, b.output) == (StageStatus.PENDING, None)
    events = await engine.kernel.reads.events(run_id)
    assert [e.stage_id for e in events if e.type == "stage:completed"] == ["a"]
    async with engine.kernel.deps.persistence.transaction() as tx:
        job = await engine.kernel.deps.job_transport.get(tx, chained.id)
    assert job is not None
    assert job.status is JobStatus.QUEUED  # there for another attempt


async def test_a_run_changed_while_the_body_ran_still_commits_the_result(
    engine: Engine,
) -> None:
    """An annotation merged into the run's search attributes during the body moves the
    run to a new version: the read-free commit's run guard fails, and the reading path
    commits the result as usual (it is not a ghost), with the annotation kept."""
    run_id, chained = await _chained_b(engine)
    before = (await engine.get_run(run_id)).version

    async def annotate() -> None:
        await engine.kernel.annotations.attach(run_id, {"reviewer": "ada"})
        assert (await engine.get_run(run_id)).version > before  # the guard has work to do

    result = await _while_b_runs(engine, chained, annotate)
    assert (result.outcome, result.ghost) == ("completed", False)
    assert result.chained_job is not None
    assert (
        await engine.kernel.dispatch(
            c.JobExecute(job_id=result.chained_job.id, worker_id="w1", chain=True)
        )
    ).outcome == "completed"
    run = await engine.get_run(run_id)
    assert (run.status, run.output) == (RunStatus.COMPLETED, {"n": 4})
    assert run.search_attributes.get("reviewer") == "ada"
    sequences = [e.sequence for e in await engine.kernel.reads.events(run_id)]
    assert sequences == list(range(1, len(sequences) + 1))  # gap-free, nothing twice


async def test_a_chained_stage_commits_with_writes_only(engine: Engine) -> None:
    """The result commit of a chained stage reads nothing back: one transaction of
    writes (on PostgreSQL ONE statement, ``tx.write_set``: run, new job, done job, both
    stages and the events with their sequence numbers as the CTEs of one ``WITH``, sent
    without BEGIN/COMMIT)."""
    if engine.backend is None or engine.backend.kind == "memory":
        return  # nothing to count: the memory adapter has no statements
    run_id, chained = await _chained_b(engine)
    sync_engine = engine.backend.persistence.engine.sync_engine  # type: ignore[attr-defined]
    statements: list[str] = []
    commits: list[bool] = []

    autocommit: list[bool] = []

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(" ".join(statement.split()).upper())
        autocommit.append(bool(getattr(conn.connection.driver_connection, "autocommit", False)))

    def on_commit(conn: Any) -> None:
        commits.append(True)

    event.listen(sync_engine, "before_cursor_execute", on_execute)
    event.listen(sync_engine, "commit", on_commit)
    try:
        result = await engine.kernel.dispatch(
            c.JobExecute(job_id=chained.id, worker_id="w1", chain=True)
        )
    finally:
        event.remove(sync_engine, "before_cursor_execute", on_execute)
        event.remove(sync_engine, "commit", on_commit)
    assert (result.outcome, result.ghost) == ("completed", False)
    assert result.chained_job is not None
    assert len(commits) == 1
    assert [s for s in statements if s.startswith("SELECT")] == []
    if engine.backend.kind == "postgresql":
        assert len(statements) == 1, statements
        assert statements[0].startswith("WITH W_R AS (UPDATE"), statements
        # One run's set: scalar parameters (cheap for the server to plan, no record
        # sets to join), and the run's unchanged columns are not rewritten.
        assert "JSONB_TO_RECORDSET" not in statements[0]
        run_update, rest = statements[0].split("RETURNING", 1)
        assert "CURRENT_GROUP =" in run_update
        assert " STATUS =" not in run_update  # the run stays RUNNING
        for column in ("INPUT", "CONFIG", "SEARCH_ATTRIBUTES", "WORKFLOW_ID"):
            assert f" {column} =" not in run_update
        stage_updates = rest.split("UPDATE STAGES")[1:]
        assert len(stage_updates) == 2  # b completed, c started
        for update in stage_updates:
            assert " STATUS =" in update
            assert " SUSPENDED_STATE =" not in update  # unchanged, not rewritten
        # The whole transaction is that statement: sent without BEGIN and COMMIT, one
        # round trip (atomic by itself).
        assert autocommit == [True]
    run = await engine.get_run(run_id)
    assert [s.status for s in run.stages] == [
        StageStatus.COMPLETED,
        StageStatus.COMPLETED,
        StageStatus.RUNNING,
    ]
