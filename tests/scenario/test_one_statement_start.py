"""A start claimed for an in-process worker (``run.create`` with ``claim_for``, what
``engine.start`` sends while a worker of this engine runs): the run RUNNING, its first
job leased and started, its stages and events. On PostgreSQL all of it is ONE statement
sent without BEGIN/COMMIT (``tx.insert_set``, adapters/sql/persistence/insert_set.py);
elsewhere the per-kind inserts. Either way the same rows."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from sqlalchemy import event

from treadle import Engine, WorkflowBuilder, define_stage
from treadle.kernel import commands as c
from treadle.kernel.model import JobStatus, RunStatus, StageStatus


class Num(BaseModel):
    n: int


def _step(stage_id: str) -> Any:
    @define_stage(id=stage_id, input=Num, output=Num)
    async def step(ctx):  # type: ignore[no-untyped-def]
        return Num(n=ctx.input.n + 1)

    return step


SEQ = WorkflowBuilder("seq", input=Num).pipe(_step("a")).pipe(_step("b")).pipe(_step("c")).build()
WORKFLOWS = [SEQ]


async def test_a_claimed_start_writes_the_started_run_in_one_statement(engine: Engine) -> None:
    statements: list[str] = []
    autocommit: list[bool] = []

    def on_execute(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(" ".join(statement.split()).upper())
        autocommit.append(bool(getattr(conn.connection.driver_connection, "autocommit", False)))

    backend = engine.backend
    sync_engine = getattr(getattr(backend, "persistence", None), "engine", None)
    if sync_engine is not None:
        event.listen(sync_engine.sync_engine, "before_cursor_execute", on_execute)
    try:
        created = await engine.kernel.dispatch(
            c.RunCreate(workflow_id="seq", input={"n": 1}, claim_for="w1")
        )
    finally:
        if sync_engine is not None:
            event.remove(sync_engine.sync_engine, "before_cursor_execute", on_execute)
    if backend is not None and backend.kind == "postgresql":
        assert len(statements) == 1, statements
        (sql,) = statements
        assert sql.startswith('WITH W_R AS (INSERT INTO "RUNS"'), sql
        for table in ('"JOBS"', '"STAGES"', "OUTBOX"):
            assert f"INSERT INTO {table}" in sql
        assert autocommit == [True]  # the whole transaction: one round trip
    # The same rows on every backend.
    assert created.chained_job is not None
    assert created.chained_job.status is JobStatus.LEASED
    assert created.chained_job.worker_id == "w1"
    run = await engine.get_run(created.workflow_run_id)
    assert run.status is RunStatus.RUNNING
    assert [(s.stage_id, s.status) for s in run.stages] == [
        ("a", StageStatus.RUNNING),
        ("b", StageStatus.PENDING),
        ("c", StageStatus.PENDING),
    ]
    events = await engine.kernel.reads.events(created.workflow_run_id)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[0].type == "workflow:created"


async def test_a_claimed_start_with_a_key_taken_returns_that_run(engine: Engine) -> None:
    first = await engine.kernel.dispatch(
        c.RunCreate(workflow_id="seq", input={"n": 1}, claim_for="w1", idempotency_key="k")
    )
    again = await engine.kernel.dispatch(
        c.RunCreate(workflow_id="seq", input={"n": 1}, claim_for="w1", idempotency_key="k")
    )
    assert again.workflow_run_id == first.workflow_run_id
    assert again.created is False
    assert again.chained_job is None
    run = await engine.get_run(first.workflow_run_id)
    assert run.stages[0].status is StageStatus.RUNNING  # started once
