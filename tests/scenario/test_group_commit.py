"""Group commit: stages of one worker that finish together commit in one transaction,
with set-oriented statements, and every item ends exactly as if it had committed alone
(its result, its chained next stage, its events, its idempotency record). On memory, a
SQLite file and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import BaseModel

from treadle import Engine, WorkflowBuilder, define_stage, workflow
from treadle.kernel import commands as c
from treadle.kernel.handlers.buffered_stores import BufferedRuns
from treadle.kernel.handlers.write_buffer import NotBatchableError
from treadle.kernel.model import Job, JobStatus, RunStatus, StageStatus
from treadle.runtime.jobs import job_idempotency_key
from treadle.testing import FakeClock


class Arrivals:
    """Stage bodies that have started, and a wait for the n-th."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._waiting: tuple[int, asyncio.Event] | None = None

    def arrive(self, name: str) -> None:
        self.seen.append(name)
        if self._waiting is not None and len(self.seen) >= self._waiting[0]:
            self._waiting[1].set()

    async def wait_for(self, count: int) -> None:
        if len(self.seen) < count:
            self._waiting = (count, asyncio.Event())
            await self._waiting[1].wait()
        self._waiting = None

    def __len__(self) -> int:
        return len(self.seen)


GATES: dict[str, asyncio.Event] = {}
ENTERED = Arrivals()


class Num(BaseModel):
    n: int


def _step(stage_id: str) -> Any:
    @define_stage(id=stage_id, input=Num, output=Num)
    async def step(ctx):  # type: ignore[no-untyped-def]
        ENTERED.arrive(f"{ctx.run_id}:{stage_id}")
        gate = GATES.get(stage_id)
        if gate is not None:
            await gate.wait()
        return Num(n=ctx.input.n + 1)

    return step


class Pair(BaseModel):
    b: Num
    c: Num


@define_stage(id="d", input=Pair, output=Num)
async def join(ctx):  # type: ignore[no-untyped-def]
    return Num(n=ctx.input.b.n + ctx.input.c.n)


SEQ = WorkflowBuilder("seq", input=Num).pipe(_step("a")).pipe(_step("b")).pipe(_step("c")).build()
FAN = (
    WorkflowBuilder("fan", input=Num)
    .pipe(_step("a"))
    .parallel([_step("b"), _step("c")])
    .pipe(join)
    .build()
)


@workflow(id="timed", input=Num, output=Num)
async def timed(ctx, value: Num) -> Num:  # type: ignore[no-untyped-def]
    return Num(n=value.n)


def _yield_on_begin(persistence: Any) -> None:
    """The in-memory transaction never waits, so no commit could queue behind another;
    give each the one yield to the event loop that a storage round trip has."""
    original = persistence.transaction

    @asynccontextmanager
    async def transaction(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        await asyncio.sleep(0)
        async with original(*args, **kwargs) as tx:
            yield tx

    persistence.transaction = transaction


@pytest.fixture
async def engine(url: str) -> AsyncIterator[Engine]:
    GATES.clear()
    ENTERED.seen.clear()
    async with await Engine.open(url, workflows=[SEQ, FAN, timed], clock=FakeClock()) as opened:
        if url == "memory://":
            _yield_on_begin(opened.kernel.deps.persistence)
        yield opened


# -- helpers ------------------------------------------------------------------------------
async def _queued_first_jobs(engine: Engine, count: int, workflow_id: str = "seq") -> list[Job]:
    """``count`` runs claimed without chaining, their first jobs dequeued by ``w1``."""
    for i in range(count):
        await engine.start(workflow_id, {"n": 10 * i})
    await engine.kernel.dispatch(c.RunClaimPending(worker_id="w1", max_claims=count))
    assert engine.backend is not None
    jobs = await engine.backend.job_transport.dequeue(
        "w1", engine.kernel.deps.clock.now(), limit=count
    )
    assert len(jobs) == count
    return jobs


def _command(job: Job, worker: str = "w1", *, keyed: bool = True) -> c.JobExecute:
    """``keyed=False``: as the runtime sends a chained job (``runtime/jobs.py``: no
    message can deliver it twice, so it records no idempotency result)."""
    key = job_idempotency_key(job) if keyed else None
    return c.JobExecute(job_id=job.id, worker_id=worker, idempotency_key=key, chain=True)


async def _execute_together(
    engine: Engine, jobs: list[Job], gated: str, before_release: Any = None, *, keyed: bool = True
) -> list[c.JobExecuteResult]:
    """Execute ``jobs`` concurrently with stage ``gated`` held until every body has
    entered it, then release them at once: finishing in the same turn of the event loop,
    they commit as one group on SQL backends (a new leader waits that one turn), as a
    lone commit and then a group of the rest in memory (``_rounds``)."""
    gate = GATES[gated] = asyncio.Event()
    entered = len(ENTERED)
    tasks = [
        asyncio.create_task(engine.kernel.dispatch(_command(job, keyed=keyed))) for job in jobs
    ]
    await ENTERED.wait_for(entered + len(jobs))
    if before_release is not None:
        await before_release()
    gate.set()
    results = await asyncio.gather(*tasks)
    del GATES[gated]
    return list(results)


def _rounds(engine: Engine) -> int:
    """Groups that stages finishing in one turn of the event loop form: one where a new
    leader waits that turn (``GroupCommit`` gathers on SQL backends); two in memory,
    where it does not (the first commits alone, the rest queue behind it)."""
    return 2 if getattr(engine.kernel.deps.persistence, "local_reads", False) else 1


def _group_counts(engine: Engine) -> tuple[int, int]:
    commits = engine.kernel.deps.commits
    return commits.groups, commits.items


class StatementLog:
    """The first words of each SQL statement the engine runs while started."""

    def __init__(self, engine: Engine) -> None:
        assert engine.backend is not None
        self._sql = engine.backend.persistence.engine.sync_engine  # type: ignore[attr-defined]
        self.seen: list[str] = []

    def _record(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.seen.append(" ".join(statement.split()[:3]).upper())

    async def start(self) -> None:
        sa.event.listen(self._sql, "before_cursor_execute", self._record)

    def stop(self) -> list[str]:
        sa.event.remove(self._sql, "before_cursor_execute", self._record)
        return [s for s in self.seen if not s.startswith(("BEGIN", "COMMIT"))]


async def _run_to_completion(engine: Engine, results: list[c.JobExecuteResult]) -> None:
    pending = [r.chained_job for r in results if r.chained_job is not None]
    while pending:
        done = await asyncio.gather(*(engine.kernel.dispatch(_command(j)) for j in pending))
        pending = [r.chained_job for r in done if r.chained_job is not None]


# -- tests --------------------------------------------------------------------------------
async def test_stages_finishing_together_commit_as_one_group(engine: Engine) -> None:
    """Four runs' first stages finish at once and commit together (one group on SQL
    backends). Each result, chained next stage, event stream and idempotency record is
    what a lone commit gives; then the chains carry every run to completion."""
    jobs = await _queued_first_jobs(engine, 4)
    groups, items = _group_counts(engine)
    results = await _execute_together(engine, jobs, "a")
    assert _group_counts(engine) == (groups + _rounds(engine), items + 4)
    for job, result in zip(jobs, results, strict=True):
        assert (result.outcome, result.ghost, result.stage_id) == ("completed", False, "a")
        assert result.workflow_run_id == job.workflow_run_id
        chained = result.chained_job
        assert chained is not None
        assert (chained.stage_id, chained.status, chained.worker_id) == (
            "b",
            JobStatus.LEASED,
            "w1",
        )
        run = await engine.get_run(job.workflow_run_id)
        stages = {s.stage_id: s for s in run.stages}
        assert (stages["a"].status, stages["a"].attempt) == (StageStatus.COMPLETED, 1)
        assert (stages["b"].status, stages["b"].job_id) == (StageStatus.RUNNING, chained.id)
        assert run.current_group == 1
        events = await engine.kernel.reads.events(job.workflow_run_id)
        assert [(e.type, getattr(e, "stage_id", None)) for e in events] == [
            ("workflow:created", None),
            ("workflow:started", None),
            ("stage:started", "a"),
            ("stage:completed", "a"),
            ("stage:started", "b"),
        ]
        assert [e.sequence for e in events] == [1, 2, 3, 4, 5]
    # The idempotency records were written: a redelivery replays instead of running.
    entered = len(ENTERED)
    replayed = await engine.kernel.dispatch(_command(jobs[3]))
    assert replayed == results[3]
    assert len(ENTERED) == entered

    await _run_to_completion(engine, results)
    for i, job in enumerate(jobs):
        run = await engine.get_run(job.workflow_run_id)
        assert run.status is RunStatus.COMPLETED
        assert run.output == {"n": 10 * i + 3}
        assert {s.stage_id: s.attempt for s in run.stages} == {"a": 1, "b": 1, "c": 1}


async def test_two_stages_of_one_run_in_one_group_see_each_other(engine: Engine) -> None:
    """A parallel group's two stages commit in the same group: the second sees the
    first's result, so exactly one of them completes the group and chains the join."""
    (first,) = await _queued_first_jobs(engine, 1, "fan")
    [other] = await _queued_first_jobs(engine, 1, "seq")
    start = await engine.kernel.dispatch(_command(first))
    assert start.chained_job is not None
    assert start.chained_job.stage_id == "b"
    assert engine.backend is not None
    (sibling,) = await engine.backend.job_transport.dequeue(
        "w1", engine.kernel.deps.clock.now(), limit=5
    )
    assert sibling.stage_id == "c"
    # One gate, waited on in this order: the other run's "a", and "b" and "c" of the fan
    # run, finish in the same turn of the event loop and form one group.
    GATES["a"] = GATES["b"] = GATES["c"] = gate = asyncio.Event()
    groups, items = _group_counts(engine)
    tasks = [
        asyncio.create_task(engine.kernel.dispatch(_command(job)))
        for job in (other, start.chained_job, sibling)
    ]
    await ENTERED.wait_for(4)  # a (fan, already done), then a (seq), b, c
    gate.set()
    done = await asyncio.gather(*tasks)
    GATES.clear()
    assert _group_counts(engine) == (groups + _rounds(engine), items + 3)
    fan_results = done[1:]
    joins = [r.chained_job for r in fan_results if r.chained_job is not None]
    assert [j.stage_id for j in joins] == ["d"]
    await _run_to_completion(engine, [done[0], *fan_results])
    run = await engine.get_run(first.workflow_run_id)
    assert run.status is RunStatus.COMPLETED
    assert run.output == {"n": 4}
    events = await engine.kernel.reads.events(first.workflow_run_id)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))


async def test_a_run_cancelled_meanwhile_is_a_ghost_and_the_rest_commit(engine: Engine) -> None:
    jobs = await _queued_first_jobs(engine, 3)
    victim = jobs[2].workflow_run_id

    async def cancel() -> None:
        await engine.cancel(victim, reason="test")

    results = await _execute_together(engine, jobs, "a", before_release=cancel)
    assert [r.ghost for r in results] == [False, False, True]
    assert results[2].chained_job is None
    assert (await engine.get_run(victim)).status is RunStatus.CANCELLED
    for job in jobs[:2]:
        stages = {s.stage_id: s for s in (await engine.get_run(job.workflow_run_id)).stages}
        assert stages["a"].status is StageStatus.COMPLETED


async def test_a_group_the_buffer_cannot_carry_commits_each_item_alone(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever stops a group (here: the buffer refusing a run update), every item still
    commits, alone, with the outcome it would have had."""

    async def refuse(self: BufferedRuns, run: Any) -> Any:
        raise NotBatchableError("refused by the test")

    monkeypatch.setattr(BufferedRuns, "update", refuse)
    jobs = await _queued_first_jobs(engine, 3)
    groups, items = _group_counts(engine)
    results = await _execute_together(engine, jobs, "a")
    assert _group_counts(engine) == (groups + _rounds(engine), items + 3)  # then each alone
    assert all(r.outcome == "completed" and r.chained_job is not None for r in results)
    monkeypatch.undo()
    await _run_to_completion(engine, results)
    for job in jobs:
        assert (await engine.get_run(job.workflow_run_id)).status is RunStatus.COMPLETED


async def test_group_commit_off_commits_every_stage_alone(engine: Engine) -> None:
    deps = engine.kernel.deps
    deps.settings = replace(deps.settings, group_commit=False)
    jobs = await _queued_first_jobs(engine, 3)
    groups, items = _group_counts(engine)
    results = await _execute_together(engine, jobs, "a")
    assert _group_counts(engine) == (groups, items)
    assert all(r.outcome == "completed" for r in results)


@pytest.mark.parametrize(
    "url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_a_group_costs_a_fixed_number_of_statements(engine: Engine) -> None:
    """The point of the group: its statements do not grow with its size. The phase-3
    commit of a chained stage alone is about a dozen statements; a group of five costs
    fewer than that. (Counted on the SQL backends, which have statements.)"""
    jobs = await _queued_first_jobs(engine, 6)
    log = StatementLog(engine)  # from the moment the bodies are released: phase 3 only
    await _execute_together(engine, jobs, "a", before_release=log.start)
    work = log.stop()
    assert _group_counts(engine) == (1, 6)
    # One group of six: at most three reads and one statement per kind of write (on
    # PostgreSQL two: the writes, the idempotency records).
    assert len(work) <= 11, work


async def test_a_claim_of_several_runs_is_set_oriented_and_chains(engine: Engine) -> None:
    for i in range(4):
        await engine.start("seq", {"n": i})
    result = await engine.kernel.dispatch(c.RunClaimPending(worker_id="w1", chain=2))
    assert len(result.claimed) == 4
    assert [j.stage_id for j in result.chained_jobs] == ["a", "a"]
    for claimed in result.claimed:
        run = await engine.get_run(claimed.workflow_run_id)
        assert run.status is RunStatus.RUNNING
        events = await engine.kernel.reads.events(run.id)
        assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    chained_runs = {j.workflow_run_id for j in result.chained_jobs}
    for claimed in result.claimed:
        a = {s.stage_id: s for s in (await engine.get_run(claimed.workflow_run_id)).stages}["a"]
        expected = (
            StageStatus.RUNNING if claimed.workflow_run_id in chained_runs else StageStatus.PENDING
        )
        assert a.status is expected


async def test_a_claim_with_a_code_workflow_takes_the_plain_path(engine: Engine) -> None:
    """A code workflow's start arms timers, which the buffer does not carry: the claim
    falls back to the plain path in the same transaction and claims every run."""
    await engine.start("seq", {"n": 1})
    await engine.start("timed", {"n": 2})
    await engine.start("seq", {"n": 3})
    result = await engine.kernel.dispatch(c.RunClaimPending(worker_id="w1"))
    assert len(result.claimed) == 3
    for claimed in result.claimed:
        assert (await engine.get_run(claimed.workflow_run_id)).status is RunStatus.RUNNING


@pytest.mark.parametrize(
    "url", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_a_group_of_chained_stages_commits_without_reading(engine: Engine) -> None:
    """Chained stages (started by the commit before them, so this worker knows their job,
    run and stages as last written) commit as a group without reading anything back:
    the writes go out guarded by the versions and leases they expect, on PostgreSQL as
    ONE statement for the whole group, where the reading group costs three reads
    besides its writes."""
    jobs = await _queued_first_jobs(engine, 6)
    firsts = await _execute_together(engine, jobs, "a")
    chained = [r.chained_job for r in firsts]
    assert all(j is not None and j.stage_id == "b" for j in chained)
    log = StatementLog(engine)
    groups, items = _group_counts(engine)
    seconds = [j for j in chained if j is not None]
    await _execute_together(engine, seconds, "b", log.start, keyed=False)
    work = log.stop()
    assert _group_counts(engine) == (groups + 1, items + 6)
    assert not [s for s in work if s.startswith("SELECT")], work
    if getattr(engine.kernel.deps.persistence, "dialect_name", None) == "postgresql":
        assert len(work) == 1, work  # the group's one statement
    for job in jobs:
        stages = {s.stage_id: s for s in (await engine.get_run(job.workflow_run_id)).stages}
        assert (stages["b"].status, stages["c"].status) == (
            StageStatus.COMPLETED,
            StageStatus.RUNNING,
        )
