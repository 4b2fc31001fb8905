"""Forking a code-workflow run (issue 5, point 10): ``engine.fork(run_id, from_step=)``
creates a new run that reuses the source's journal before that step and runs the rest
afresh. On the TestEngine, and through ``Engine.open`` on memory, a SQLite file and
PostgreSQL (a database per test)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from treadle import (
    Engine,
    RunStatus,
    StageContext,
    WorkflowBuilder,
    WorkflowContext,
    define_stage,
    workflow,
)
from treadle.kernel.errors import (
    InvalidStateError,
    NotSupportedError,
    RunNotFoundError,
    StepNotFoundError,
    TreadleValidationError,
)
from treadle.kernel.events import WorkflowCreated
from treadle.kernel.workflows import JournalStatus
from treadle.testing import TestEngine
from treadle.testing.databases import postgres_database, sqlite_database
from treadle.tests.scenario.helpers import WAIT, worker


class Order(BaseModel):
    n: int


class Approval(BaseModel):
    by: str


CALLS: dict[str, int] = {}
OFFSET = {"value": 0}
"""What ``transform`` adds: tests change it between the source run and the fork, so the
fork's output shows which steps ran again."""


def _count(name: str) -> None:
    CALLS[name] = CALLS.get(name, 0) + 1


async def fetch(n: int) -> int:
    _count("fetch")
    return n * 10


def transform(a: int) -> int:
    _count("transform")
    return a + OFFSET["value"]


async def store(b: int) -> str:
    _count("store")
    return f"stored {b}"


async def page(i: int) -> int:
    _count(f"page-{i}")
    return i + OFFSET["value"]


@workflow(id="etl", input=Order, output=dict[str, Any], version="1")
async def etl(ctx: WorkflowContext, order: Order) -> dict[str, Any]:
    stamp = ctx.uuid()
    a: int = await ctx.step("fetch", fetch, order.n)
    b: int = await ctx.step("transform", transform, a)
    ctx.publish("phase", "transformed")
    c: str = await ctx.step("store", store, b)
    return {"a": a, "b": b, "c": c, "stamp": stamp}


def transform_v2(a: int) -> int:
    _count("transform_v2")
    return -a


@workflow(id="etl", input=Order, output=dict[str, Any], version="2")
async def etl_v2(ctx: WorkflowContext, order: Order) -> dict[str, Any]:
    """The next deploy of ``etl``: the same calls, a fixed ``transform``."""
    stamp = ctx.uuid()
    a: int = await ctx.step("fetch", fetch, order.n)
    b: int = await ctx.step("transform", transform_v2, a)
    ctx.publish("phase", "transformed")
    c: str = await ctx.step("store", store, b)
    return {"a": a, "b": b, "c": c, "stamp": stamp}


@workflow(id="pages", input=Order, output=list[int])
async def pages(ctx: WorkflowContext, order: Order) -> list[int]:
    return [await ctx.step("page", page, i) for i in range(order.n)]


@workflow(id="approved-etl", input=Order, output=str, signals={"approve": Approval})
async def approved_etl(ctx: WorkflowContext, order: Order) -> str:
    a: int = await ctx.step("fetch", fetch, order.n)
    approval = await ctx.wait_for_signal("approve", Approval)
    b: int = await ctx.step("transform", transform, a)
    return f"{b} approved by {approval.by}"


@workflow(id="priced", input=Order, output=int, updates={"price": Order})
async def priced(ctx: WorkflowContext, order: Order) -> int:
    request = await ctx.wait_for_update("price", Order)
    b: int = await ctx.step("transform", transform, request.payload.n)
    await request.reply(b)
    return b


class Doc(BaseModel):
    text: str


async def big(text: str) -> str:
    _count("big")
    return text + "7"


@workflow(id="bulky", input=Doc, output=int)
async def bulky(ctx: WorkflowContext, doc: Doc) -> int:
    text: str = await ctx.step("big", big, doc.text)
    return await ctx.step("measure", lambda value: len(value), text)


class Num(BaseModel):
    n: int


@define_stage(id="inc", input=Num, output=Num)
async def inc(ctx: StageContext[Num, None]) -> Num:
    return Num(n=ctx.input.n + 1)


pipeline = WorkflowBuilder("inc-pipeline", input=Num).pipe(inc).build()

WORKFLOWS = [etl, pages, approved_etl, priced, bulky, pipeline]


@pytest.fixture(autouse=True)
def _reset() -> None:
    CALLS.clear()
    OFFSET["value"] = 0


# -- the TestEngine ---------------------------------------------------------------------------
async def test_fork_from_a_middle_step_reuses_earlier_results_on_the_test_engine() -> None:
    """Steps before ``from_step`` are not called again (their results and the journaled
    uuid are reused); the step itself and later ones run afresh under today's code."""
    te = TestEngine(WORKFLOWS)
    source = await te.start("etl", {"n": 4})
    first = await source.result()
    assert first["b"] == 40
    OFFSET["value"] = 5  # a fixed bug: transform now adds 5
    fork = await te.fork(source.run_id, "transform")
    output = await fork.result()
    assert output == {"a": 40, "b": 45, "c": "stored 45", "stamp": first["stamp"]}
    assert CALLS == {"fetch": 1, "transform": 2, "store": 2}
    run = await te.get_run(fork.run_id)
    assert run.search_attributes["forked_from"] == source.run_id
    assert run.search_attributes["forked_from_step"] == "transform#1"
    assert (await te.get_run(source.run_id)).output == first  # the source is untouched


async def test_fork_names_a_later_occurrence_with_a_hash() -> None:
    """``"page#3"`` forks from the third ``ctx.step("page", ...)``; ``"page"`` is the first."""
    te = TestEngine(WORKFLOWS)
    source = await te.start("pages", {"n": 4})
    assert await source.result() == [0, 1, 2, 3]
    OFFSET["value"] = 100
    third = await te.fork(source.run_id, "page#3")
    assert await third.result() == [0, 1, 102, 103]
    assert CALLS == {"page-0": 1, "page-1": 1, "page-2": 2, "page-3": 2}
    first = await te.fork(source.run_id, "page")
    assert await first.result() == [100, 101, 102, 103]
    with pytest.raises(StepNotFoundError, match=r"from_step: .*no step 'page#5'"):
        await te.fork(source.run_id, "page#5")


async def test_fork_reuses_a_consumed_signal_and_waits_afresh_when_cut_before_it() -> None:
    """A signal received before the cut is replayed from the fork's own inbox copy; a fork
    from a step before the wait waits for a new signal (the old one is not re-delivered)."""
    te = TestEngine(WORKFLOWS)
    source = await te.start("approved-etl", {"n": 1})
    await te.run_until_idle()
    await te.signal(source.run_id, "approve", {"by": "ann"})
    assert await source.result() == "10 approved by ann"

    after = await te.fork(source.run_id, "transform")
    assert await after.result() == "10 approved by ann"
    (copied,) = await te.kernel.reads.inbox(after.run_id)
    assert (copied.payload, copied.consumed_at is not None) == ({"by": "ann"}, True)
    (wait,) = [e for e in await te.journal(after.run_id) if e.kind == "signal"]
    assert isinstance(wait.result, dict)
    assert wait.result["message_id"] == copied.id

    before = await te.fork(source.run_id, "fetch")
    await te.run_until_idle()
    assert (await te.get_run(before.run_id)).status is RunStatus.SUSPENDED
    assert await te.kernel.reads.inbox(before.run_id) == []
    await te.signal(before.run_id, "approve", {"by": "bob"})
    assert await before.result() == "10 approved by bob"
    assert CALLS == {"fetch": 2, "transform": 3}


async def test_an_update_answered_after_the_cut_is_answered_on_the_forks_copy() -> None:
    """The fork replies to its own copy of the update; the source's reply is unchanged."""
    te = TestEngine(WORKFLOWS)
    source = await te.start("priced", {"n": 0})
    await te.run_until_idle()
    assert await te.update(source.run_id, "price", {"n": 3}) == 3
    OFFSET["value"] = 1
    fork = await te.fork(source.run_id, "transform")
    assert await fork.result() == 4
    (copy,) = await te.kernel.reads.inbox(fork.run_id)
    (original,) = await te.kernel.reads.inbox(source.run_id)
    assert copy.update_id is not None
    assert await te.kernel.reads.update_reply(fork.run_id, copy.update_id) == (True, 4)
    assert original.update_id is not None
    assert await te.kernel.reads.update_reply(source.run_id, original.update_id) == (True, 3)


async def test_fork_of_a_failed_run_reruns_the_failing_step() -> None:
    """The usual repair: a run failed at a step; after the fix, a fork from that step
    completes without repeating the steps that had succeeded."""
    te = TestEngine(WORKFLOWS)
    te.mock_step("store", lambda b: (_ for _ in ()).throw(ValueError("disk full")))
    source = await te.start("etl", {"n": 2})
    await te.run_until_idle()
    await te.advance_time(60)
    assert (await te.get_run(source.run_id)).status is RunStatus.FAILED
    te.mock_step("store", lambda b: f"saved {b}")
    fork = await te.fork(source.run_id, "store")
    assert (await fork.result())["c"] == "saved 20"
    assert CALLS == {"fetch": 1, "transform": 1}


async def test_fork_past_an_unfinished_wait_is_refused() -> None:
    """A journal whose entry before the cut is still waiting cannot be reused (a body
    reaches no step past a pending wait today; the entry is written by hand here)."""
    te = TestEngine(WORKFLOWS)
    source = await te.start("approved-etl", {"n": 1})
    await te.run_until_idle()
    (_, wait) = await te.journal(source.run_id)
    assert wait.status is JournalStatus.WAITING
    async with te.persistence.transaction() as tx:
        await tx.journal.insert(
            wait.model_copy(
                update={
                    "id": None,
                    "position": 2,
                    "name": "transform",
                    "kind": "step",
                    "status": JournalStatus.COMPLETED,
                }
            )
        )
    runs = len(await te.kernel.reads.list_runs())
    with pytest.raises(InvalidStateError, match="signal 'approve' #1 before it is still WAITING"):
        await te.fork(source.run_id, "transform")
    assert len(await te.kernel.reads.list_runs()) == runs


async def test_fork_from_a_middle_step_on_every_backend(engine: Engine) -> None:
    """The fork copies the journal before ``transform`` (uuid, fetch) in one go with the
    run, links to its source by search attribute and ``workflow:created``, and re-runs
    ``transform`` and ``store`` only."""
    async with worker(engine):
        source = await engine.start("etl", {"n": 3})
        first = await source.result(timeout=WAIT)
        OFFSET["value"] = 7
        fork = await engine.fork(source.run_id, "transform")
        output = await fork.result(timeout=WAIT)
    assert output == {"a": 30, "b": 37, "c": "stored 37", "stamp": first["stamp"]}
    assert CALLS == {"fetch": 1, "transform": 2, "store": 2}
    run = await engine.get_run(fork.run_id)
    assert (run.workflow_id, run.input, run.workflow_version) == ("etl", {"n": 3}, "1")
    assert run.id != source.run_id
    journal = await engine.journal(fork.run_id)
    assert [(e.kind, e.name, e.status) for e in journal] == [
        ("uuid", "uuid", JournalStatus.COMPLETED),
        ("step", "fetch", JournalStatus.COMPLETED),
        ("step", "transform", JournalStatus.COMPLETED),
        ("publish", "publish:phase", JournalStatus.COMPLETED),
        ("step", "store", JournalStatus.COMPLETED),
    ]
    assert await engine.query(fork.run_id, "phase") == "transformed"
    (created,) = [e async for e in engine.events(fork.run_id) if e.type == "workflow:created"]
    assert isinstance(created, WorkflowCreated)
    assert (created.forked_from, created.forked_from_step) == (source.run_id, "transform#1")
    forks = await engine.list(attributes={"forked_from": source.run_id})
    assert [r.id for r in forks] == [fork.run_id]


async def test_fork_from_the_first_step_runs_every_step_again(engine: Engine) -> None:
    """Forking from the first step keeps only what came before it (the journaled uuid)."""
    async with worker(engine):
        source = await engine.start("etl", {"n": 1})
        first = await source.result(timeout=WAIT)
        fork = await engine.fork(source.run_id, "fetch")
        output = await fork.result(timeout=WAIT)
    assert output == first
    assert CALLS == {"fetch": 2, "transform": 2, "store": 2}
    assert [e.kind for e in await engine.journal(fork.run_id)][:2] == ["uuid", "step"]


async def test_forking_again_with_the_same_key_returns_the_first_fork(engine: Engine) -> None:
    """``idempotency_key`` makes a retried fork (a client that timed out) a no-op."""
    async with worker(engine):
        source = await engine.start("etl", {"n": 2})
        await source.result(timeout=WAIT)
        first = await engine.fork(source.run_id, "store", idempotency_key="fix-1")
        again = await engine.fork(source.run_id, "store", idempotency_key="fix-1")
        other = await engine.fork(source.run_id, "store", idempotency_key="fix-2")
        await first.result(timeout=WAIT)
        await other.result(timeout=WAIT)
    assert again.run_id == first.run_id != other.run_id
    forks = await engine.list(attributes={"forked_from": source.run_id})
    assert sorted(r.id for r in forks) == sorted([first.run_id, other.run_id])
    assert CALLS["store"] == 3


async def test_fork_refuses_bad_requests_and_writes_nothing(engine: Engine) -> None:
    """An unknown run, a pipeline run and a step the journal lacks are refused with an
    error naming the argument; no run is created."""
    async with worker(engine):
        source = await engine.start("etl", {"n": 1})
        await source.result(timeout=WAIT)
        piped = await engine.start("inc-pipeline", {"n": 1})
        await piped.result(timeout=WAIT)
    before = {r.id for r in await engine.list(limit=100)}
    with pytest.raises(RunNotFoundError, match="no run with id 'nope'"):
        await engine.fork("nope", "fetch")
    with pytest.raises(NotSupportedError, match="rerun_from"):
        await engine.fork(piped.run_id, "inc")
    with pytest.raises(StepNotFoundError, match=r"from_step: .*no step 'lookup'.*'fetch'"):
        await engine.fork(source.run_id, "lookup")
    with pytest.raises(TreadleValidationError, match="from_step"):
        await engine.fork(source.run_id, "")
    assert {r.id for r in await engine.list(limit=100)} == before


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_a_reused_offloaded_result_is_stored_anew_for_the_fork(
    backend: str, tmp_path: Path
) -> None:
    """A run input and a step result above ``payload_max_bytes`` are copied into blobs of
    the fork's own, so the fork never depends on the source run's payloads."""
    import sqlalchemy as sa

    from treadle.adapters.sql import schema as t

    with contextlib.ExitStack() as stack:
        if backend == "sqlite":
            db = sqlite_database(tmp_path)
        else:
            db = stack.enter_context(postgres_database(migrate=True, prefix="treadle_fork"))
        async with await Engine.open(db, workflows=WORKFLOWS, payload_max_bytes=128) as engine:
            async with worker(engine):
                source = await engine.start("bulky", {"text": "x" * 400})
                assert await source.result(timeout=WAIT) == 401
                fork = await engine.fork(source.run_id, "measure")
                assert await fork.result(timeout=WAIT) == 401
            assert CALLS == {"big": 1}
            (reused, _) = await engine.journal(fork.run_id)
            assert reused.result == "x" * 400 + "7"
            assert engine.backend is not None
            async with engine.backend.persistence.engine.connect() as conn:  # type: ignore[attr-defined]
                rows = (
                    await conn.execute(
                        sa.select(t.journal.c.run_id, t.journal.c.result).where(
                            t.journal.c.step_name == "big"
                        )
                    )
                ).all()
                inputs = (await conn.execute(sa.select(t.runs.c.id, t.runs.c.input))).all()
    for stored in (
        {row.run_id: row.result["__treadle_blob__"] for row in rows},
        {row.id: row.input["__treadle_blob__"] for row in inputs},
    ):
        assert set(stored) == {source.run_id, fork.run_id}
        assert fork.run_id in stored[fork.run_id]
        assert source.run_id not in stored[fork.run_id]


async def test_the_fork_is_pinned_to_the_version_registered_now(tmp_path: Path) -> None:
    """A run of version 1, forked after a deploy of version 2, runs the rest on the new
    code and records version 2; the source keeps version 1."""
    db = f"sqlite:///{tmp_path / 'treadle.db'}"
    async with await Engine.open(db, workflows=WORKFLOWS) as engine, worker(engine):
        source = await engine.start("etl", {"n": 5})
        await source.result(timeout=WAIT)
    deployed = [etl_v2 if wf is etl else wf for wf in WORKFLOWS]
    async with await Engine.open(db, workflows=deployed) as engine:
        async with worker(engine):
            fork = await engine.fork(source.run_id, "transform")
            assert (await fork.result(timeout=WAIT))["b"] == -50
        assert (await engine.get_run(fork.run_id)).workflow_version == "2"
        assert (await engine.get_run(source.run_id)).workflow_version == "1"
    assert CALLS == {"fetch": 1, "transform": 1, "transform_v2": 1, "store": 2}
