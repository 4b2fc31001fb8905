"""A code workflow's commits without reads (``kernel/workflows/executor.py``): each step's
result is committed, guarded by what the activation owns (run and stage versions, the
job's lease), when the body reaches its next durable call, and the last one together
with the run's completion. On PostgreSQL each of those commits is ONE statement sent
without BEGIN/COMMIT (``tx.append_journal``, ``tx.write_set``). Whatever took the run from
the activation meanwhile (a cancel, a reaped lease) fails a guard; the commit then goes
through the reads, which discard a ghost's result, and a change that leaves the run
owned (an annotation) is committed as before. On memory, a SQLite file and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel
from sqlalchemy import event

from treadle import Engine, RunStatus, WorkflowContext, workflow
from treadle.kernel import commands as c
from treadle.kernel.model import Job, JobStatus
from treadle.kernel.workflows import JournalStatus
from treadle.testing import FakeClock

HOLD: dict[str, asyncio.Event] = {}
ENTERED: dict[str, asyncio.Event] = {}
RAN: list[str] = []
SEEN: dict[str, list[str]] = {}
ENGINE: list[Engine] = []


class Num(BaseModel):
    n: int


def _step(name: str) -> Any:
    async def step(n: int) -> int:
        RAN.append(name)
        if ENGINE:  # what storage holds while this step runs
            run_id = WorkflowContext.current_step().idempotency_key.split(":")[0]  # type: ignore[union-attr]
            SEEN[name] = [e.name for e in await ENGINE[0].journal(run_id)]
        if name in ENTERED:
            ENTERED[name].set()
        if name in HOLD:
            await HOLD[name].wait()
        return n + 1

    return step


STEP_A, STEP_B, STEP_C = _step("a"), _step("b"), _step("c")


@workflow(id="three", input=Num, output=Num)
async def three(ctx: WorkflowContext, num: Num) -> Num:
    n = await ctx.step("a", STEP_A, num.n)
    n = await ctx.step("b", STEP_B, n)
    n = await ctx.step("c", STEP_C, n)
    return Num(n=n)


WORKFLOWS = [three]


def _reset() -> None:
    HOLD.clear()
    ENTERED.clear()
    RAN.clear()
    SEEN.clear()
    ENGINE.clear()


async def _leased(engine: Engine) -> tuple[str, Job]:
    """A started run whose activation job is leased to worker w1."""
    _reset()
    handle = await engine.start("three", {"n": 1})
    await engine.kernel.dispatch(c.RunClaimPending(worker_id="w1"))
    assert engine.backend is not None
    (job,) = await engine.backend.job_transport.dequeue("w1", engine.kernel.deps.clock.now())
    return handle.run_id, job


async def _while_held(engine: Engine, job: Job, step: str, meanwhile: Any) -> c.JobExecuteResult:
    """Execute the activation, doing ``meanwhile()`` while ``step`` runs."""
    HOLD[step], ENTERED[step] = asyncio.Event(), asyncio.Event()
    execution = asyncio.create_task(
        engine.kernel.dispatch(c.JobExecute(job_id=job.id, worker_id="w1"))
    )
    await ENTERED[step].wait()
    await meanwhile()
    HOLD[step].set()
    return await execution


async def _journal(engine: Engine, run_id: str) -> list[tuple[str, JournalStatus]]:
    return [(e.name, e.status) for e in await engine.journal(run_id)]


async def test_a_step_is_recorded_before_the_next_step_starts(engine: Engine) -> None:
    """A step's result is committed with the body's next durable call, before that call
    runs anything: each step sees every earlier step in storage."""
    run_id, job = await _leased(engine)
    ENGINE.append(engine)
    result = await engine.kernel.dispatch(c.JobExecute(job_id=job.id, worker_id="w1"))
    assert result.outcome == "completed"
    assert SEEN == {"a": [], "b": ["a"], "c": ["a", "b"]}
    done = JournalStatus.COMPLETED
    assert await _journal(engine, run_id) == [("a", done), ("b", done), ("c", done)]
    events = [e.type for e in await engine.kernel.reads.events(run_id)]
    assert events.count("step:completed") == 3
    assert events[-2:] == ["stage:completed", "workflow:completed"]
    sequences = [e.sequence for e in await engine.kernel.reads.events(run_id)]
    assert sequences == list(range(1, len(sequences) + 1))  # gap-free, nothing twice


async def test_steps_and_the_completion_commit_with_writes_only(engine: Engine) -> None:
    """From the first step on, an activation of three steps commits three times and reads
    nothing: step a's result when b starts, b's when c starts, c's with the run's
    completion. On PostgreSQL each commit is one statement without BEGIN/COMMIT."""
    if engine.backend is None or engine.backend.kind == "memory":
        return  # nothing to count: the memory adapter has no statements
    run_id, job = await _leased(engine)
    sync_engine = engine.backend.persistence.engine.sync_engine  # type: ignore[attr-defined]
    statements: list[str] = []
    autocommit: list[bool] = []
    commits: list[bool] = []

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if RAN:  # from the first step on
            statements.append(" ".join(statement.split()).upper())
            autocommit.append(bool(getattr(conn.connection.driver_connection, "autocommit", 0)))

    def on_commit(conn: Any) -> None:
        if RAN:
            commits.append(True)

    event.listen(sync_engine, "before_cursor_execute", on_execute)
    event.listen(sync_engine, "commit", on_commit)
    try:
        result = await engine.kernel.dispatch(c.JobExecute(job_id=job.id, worker_id="w1"))
    finally:
        event.remove(sync_engine, "before_cursor_execute", on_execute)
        event.remove(sync_engine, "commit", on_commit)
    assert (result.outcome, result.ghost) == ("completed", False)
    assert (await engine.get_run(run_id)).status is RunStatus.COMPLETED
    if engine.backend.kind == "postgresql":
        assert [s.split(" AS ")[0] for s in statements] == ["WITH O", "WITH O", "WITH W_R"]
        assert autocommit == [True, True, True]
    else:  # SQLite: the steps read ownership; the completion reads nothing
        assert len(commits) == 3, "\n".join(s[:60] for s in statements)
        assert not any(s.startswith("SELECT") for s in statements[-4:]), statements


async def test_a_run_cancelled_during_its_last_step_does_not_complete(engine: Engine) -> None:
    """The run is cancelled while step c runs: the completion's guards fail (the run moved
    on), and the reading commit discards the activation as a ghost: c's result is not
    recorded, the run stays CANCELLED."""
    run_id, job = await _leased(engine)

    async def cancel() -> None:
        assert await engine.cancel(run_id, reason="test")

    result = await _while_held(engine, job, "c", cancel)
    assert result.ghost
    done = JournalStatus.COMPLETED
    assert await _journal(engine, run_id) == [("a", done), ("b", done)]
    run = await engine.get_run(run_id)
    assert (run.status, run.output) == (RunStatus.CANCELLED, None)
    events = [e.type for e in await engine.kernel.reads.events(run_id)]
    assert "workflow:completed" not in events
    assert events.count("step:completed") == 2


async def test_a_lease_reaped_during_a_step_makes_its_result_a_ghost(
    engine: Engine, clock: FakeClock
) -> None:
    """The job's lease was reaped while step b ran (the stage goes back to PENDING, the job
    is queued again): b's result is not recorded and c does not start in this
    activation; the next activation replays a and runs b and c."""
    run_id, job = await _leased(engine)

    async def reap() -> None:
        clock.advance(120)
        reaped = await engine.kernel.dispatch(c.LeaseReapStale(stale_threshold=60))
        assert reaped.released == 1

    result = await _while_held(engine, job, "b", reap)
    assert result.ghost
    assert RAN == ["a", "b"]
    assert await _journal(engine, run_id) == [("a", JournalStatus.COMPLETED)]
    async with engine.kernel.deps.persistence.transaction() as tx:
        again = await engine.kernel.deps.job_transport.get(tx, job.id)
    assert again is not None
    assert again.status is JobStatus.QUEUED
    clock.advance(3600)  # past the requeued job's backoff
    (job,) = await engine.backend.job_transport.dequeue("w2", clock.now())  # type: ignore[union-attr]
    HOLD.clear()
    result = await engine.kernel.dispatch(c.JobExecute(job_id=job.id, worker_id="w2"))
    assert result.outcome == "completed"
    assert RAN == ["a", "b", "b", "c"]
    run = await engine.get_run(run_id)
    assert (run.status, run.output) == (RunStatus.COMPLETED, {"n": 4})


async def test_a_run_changed_during_a_step_still_records_it(engine: Engine) -> None:
    """An annotation merged into the run's search attributes while step b runs moves the
    run to a new version: the guard of b's commit fails, the reading commit records it
    as usual (the run is still owned), and the run completes with the annotation."""
    run_id, job = await _leased(engine)

    async def annotate() -> None:
        await engine.kernel.annotations.attach(run_id, {"reviewer": "ada"})

    result = await _while_held(engine, job, "b", annotate)
    assert (result.outcome, result.ghost) == ("completed", False)
    assert RAN == ["a", "b", "c"]
    run = await engine.get_run(run_id)
    assert (run.status, run.output) == (RunStatus.COMPLETED, {"n": 4})
    assert run.search_attributes.get("reviewer") == "ada"
    done = JournalStatus.COMPLETED
    assert await _journal(engine, run_id) == [("a", done), ("b", done), ("c", done)]
