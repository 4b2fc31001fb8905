"""The claim of a run started elsewhere (``run.claimPending``) without locks held across
round trips (``runs._claim_unlocked``): on PostgreSQL one read of the candidates with
their stages (``tx.claim_candidates``) and one write of the whole claim (run RUNNING,
first job leased to the claimer, stage started, events), each sent alone without
BEGIN/COMMIT. The write is guarded by the versions read: a run that moved on in between
is never claimed twice or claimed after a cancel or a pause; the claim falls back to
the locking path, which decides as it always did. Priority then FIFO, and flow control,
hold as before. On memory, a SQLite file and PostgreSQL (the counts on PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pydantic import BaseModel
from sqlalchemy import event

from treadle import Engine, WorkflowBuilder, define_stage
from treadle.adapters.sql.persistence import connection
from treadle.kernel import commands as c
from treadle.kernel.model import JobStatus, RunStatus, StageStatus
from treadle.testing import FakeClock


class Num(BaseModel):
    n: int


@define_stage(id="a", input=Num, output=Num)
async def a(ctx: Any) -> Num:
    return Num(n=ctx.input.n + 1)


@define_stage(id="b", input=Num, output=Num)
async def b(ctx: Any) -> Num:
    return Num(n=ctx.input.n + 1)


SEQ = WorkflowBuilder("seq", input=Num).pipe(a).pipe(b).build()
LIMITED = WorkflowBuilder("limited", input=Num, concurrency_per_key=1).pipe(a).build()
WORKFLOWS = [SEQ, LIMITED]


class Wire:
    """Statements the engine's pool sends, and whether each went alone (autocommit)
    or opened a transaction (BEGIN)."""

    def __init__(self) -> None:
        self.statements: list[str] = []
        self.modes: list[str] = []
        self.commits = 0


@contextmanager
def wire(engine: Engine) -> Iterator[Wire]:
    from psycopg.pq import TransactionStatus

    assert engine.backend is not None
    sync_engine = engine.backend.persistence.engine.sync_engine  # type: ignore[attr-defined]
    seen = Wire()

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        driver = conn.connection.driver_connection
        seen.statements.append(" ".join(statement.split()).upper())
        if driver.autocommit:
            seen.modes.append("alone")
        elif driver.info.transaction_status == TransactionStatus.IDLE:
            seen.modes.append("begin")
        else:
            seen.modes.append("in")

    def on_commit(conn: Any) -> None:
        driver = conn.connection.driver_connection
        if driver.info.transaction_status != TransactionStatus.IDLE:
            seen.commits += 1

    event.listen(sync_engine, "before_cursor_execute", on_execute)
    event.listen(sync_engine, "commit", on_commit)
    try:
        yield seen
    finally:
        event.remove(sync_engine, "before_cursor_execute", on_execute)
        event.remove(sync_engine, "commit", on_commit)


def _postgres(engine: Engine) -> bool:
    return engine.backend is not None and engine.backend.kind == "postgresql"


async def _claim(engine: Engine, *, chain: int = 1, max_claims: int = 10) -> Any:
    return await engine.kernel.dispatch(
        c.RunClaimPending(worker_id="w1", max_claims=max_claims, chain=chain)
    )


async def _job(engine: Engine, job_id: str) -> Any:
    async with engine.kernel.deps.persistence.transaction() as tx:
        return await engine.kernel.deps.job_transport.get(tx, job_id)


async def test_a_claim_is_one_read_and_one_write_each_sent_alone(engine: Engine) -> None:
    """A run started by another process (PENDING, no ``claim_for``) is claimed with its
    first stage leased to the claimer and started; on PostgreSQL in two statements, the
    candidates' read and the claim's write, neither inside BEGIN/COMMIT."""
    run_id = (await engine.start("seq", {"n": 1})).run_id
    if _postgres(engine):
        with wire(engine) as seen:
            claim = await _claim(engine)
        assert len(seen.statements) == 2, seen.statements
        assert seen.statements[0].startswith("WITH C AS (SELECT"), seen.statements
        assert "FOR UPDATE SKIP LOCKED" in seen.statements[0]
        assert seen.statements[1].startswith("WITH W_R AS (UPDATE"), seen.statements
        assert seen.modes == ["alone", "alone"]
        assert seen.commits == 0
    else:
        claim = await _claim(engine)
    assert [r.workflow_run_id for r in claim.claimed] == [run_id]
    (job,) = claim.chained_jobs
    assert (job.stage_id, job.status, job.worker_id) == ("a", JobStatus.LEASED, "w1")
    assert (await _job(engine, job.id)).status is JobStatus.LEASED
    run = await engine.get_run(run_id)
    assert (run.status, run.worker_id) == (RunStatus.RUNNING, "w1")
    first = next(s for s in run.stages if s.stage_id == "a")
    assert (first.status, first.attempt, first.job_id) == (StageStatus.RUNNING, 1, job.id)
    types = [e.type for e in await engine.kernel.reads.events(run_id)]
    assert types == ["workflow:created", "workflow:started", "stage:started"]
    result = await engine.kernel.dispatch(c.JobExecute(job_id=job.id, worker_id="w1", chain=True))
    assert result.chained_job is not None  # b, chained as after any claim
    await engine.kernel.dispatch(
        c.JobExecute(job_id=result.chained_job.id, worker_id="w1", chain=True)
    )
    assert (await engine.get_run(run_id)).output == {"n": 3}


async def test_nothing_to_claim_costs_one_statement(engine: Engine) -> None:
    """An idle worker woken for nothing (another worker took the run first) pays one
    read, no transaction."""
    if not _postgres(engine):
        return
    with wire(engine) as seen:
        claim = await _claim(engine)
    assert claim.claimed == []
    assert seen.modes == ["alone"]


async def test_priority_then_fifo_decide_which_run_is_claimed(
    engine: Engine, clock: FakeClock
) -> None:
    """One claim at a time takes the highest priority first, then the oldest."""
    low = (await engine.start("seq", {"n": 1}, priority=1)).run_id
    clock.advance(1)
    high_old = (await engine.start("seq", {"n": 2}, priority=9)).run_id
    clock.advance(1)
    high_new = (await engine.start("seq", {"n": 3}, priority=9)).run_id
    order = [(await _claim(engine, max_claims=1)).claimed[0].workflow_run_id for _ in range(3)]
    assert order == [high_old, high_new, low]


async def test_a_paused_run_is_not_claimed(engine: Engine) -> None:
    paused = (await engine.start("seq", {"n": 1})).run_id
    await engine.pause(paused)
    other = (await engine.start("seq", {"n": 2})).run_id
    claim = await _claim(engine)
    assert [r.workflow_run_id for r in claim.claimed] == [other]
    assert (await engine.get_run(paused)).status is RunStatus.PENDING


async def test_a_run_cancelled_after_the_read_is_not_claimed(
    engine: Engine, monkeypatch: Any
) -> None:
    """The run is cancelled by another transaction between the claim's read and its
    write: the write's version guard fails, nothing of the claim is written, and the
    locking claim that follows finds nothing to start."""
    if not _postgres(engine):
        return
    run_id = (await engine.start("seq", {"n": 1})).run_id
    read = connection.SqlTransaction.claim_candidates

    async def read_then_cancel(self: Any, limit: int) -> Any:
        found = await read(self, limit)
        await engine.kernel.dispatch(c.RunCancel(workflow_run_id=run_id))  # its own connection
        return found

    monkeypatch.setattr(connection.SqlTransaction, "claim_candidates", read_then_cancel)
    claim = await _claim(engine)
    assert claim.claimed == []
    assert claim.chained_jobs == []
    run = await engine.get_run(run_id)
    assert run.status is RunStatus.CANCELLED
    assert all(s.status is not StageStatus.RUNNING for s in run.stages)
    types = [e.type for e in await engine.kernel.reads.events(run_id)]
    assert "workflow:started" not in types
    assert "stage:started" not in types
    assert (
        await engine.kernel.deps.job_transport.dequeue("w2", engine.kernel.deps.clock.now()) == []
    )


async def test_a_run_claimed_by_another_worker_after_the_read_is_claimed_once(
    engine: Engine, monkeypatch: Any
) -> None:
    """Two claimers race for one run: the second's read saw it PENDING, the first
    claimed it meanwhile; the second's write fails as a whole, its locking claim finds
    nothing, and the run has one start, one job, one lease."""
    if not _postgres(engine):
        return
    run_id = (await engine.start("seq", {"n": 1})).run_id
    read = connection.SqlTransaction.claim_candidates
    first: list[Any] = []

    async def read_then_lose(self: Any, limit: int) -> Any:
        found = await read(self, limit)
        if not first:  # the other worker's claim, in between (the patch is off for it)
            monkeypatch.setattr(connection.SqlTransaction, "claim_candidates", read)
            first.append(
                await engine.kernel.dispatch(
                    c.RunClaimPending(worker_id="w2", max_claims=10, chain=1)
                )
            )
        return found

    monkeypatch.setattr(connection.SqlTransaction, "claim_candidates", read_then_lose)
    claim = await _claim(engine)
    assert claim.claimed == []
    assert claim.chained_jobs == []
    (other,) = first[0].chained_jobs
    assert other.worker_id == "w2"
    run = await engine.get_run(run_id)
    assert (run.status, run.worker_id) == (RunStatus.RUNNING, "w2")
    types = [e.type for e in await engine.kernel.reads.events(run_id)]
    assert types == ["workflow:created", "workflow:started", "stage:started"]


async def test_a_limited_workflow_is_admitted_under_its_keys_locks(engine: Engine) -> None:
    """Concurrency limits still decide: of two runs with the same key, one starts and
    the other is deferred (the claim of a limited workflow takes the locking path,
    which locks the keys and counts their usage: a BEGIN on PostgreSQL)."""
    first = (await engine.start("limited", {"n": 7}, concurrency_key="k")).run_id
    second = (await engine.start("limited", {"n": 8}, concurrency_key="k")).run_id
    if _postgres(engine):
        with wire(engine) as seen:
            claim = await _claim(engine)
        assert "begin" in seen.modes
    else:
        claim = await _claim(engine)
    assert [r.workflow_run_id for r in claim.claimed] == [first]
    assert claim.deferred == 1
    assert (await engine.get_run(second)).status is RunStatus.PENDING
