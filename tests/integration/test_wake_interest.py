"""PostgreSQL sends the wake-ups that usually have no reader only to those who asked
(``adapters/sql/wake_interest.py``, migration 0015): a run's ``end:<id>`` only for a run
a waiter marked (or while a worker waits for a concurrency slot), the event feed's
NOTIFY only while a live reader is announced. Every NOTIFY costs each LISTENing backend
of the database a transaction, so one-at-a-time runs with nobody else waiting send none.

Each test listens on its own connection, as another process would; waits are on
events and database state, never on sleeps. Engines on one database with their own
pools stand for separate processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
from pydantic import BaseModel

from treadle import Engine, WorkflowBuilder, define_stage
from treadle.adapters.sql import PgJobListener, sync_url

pytestmark = pytest.mark.postgres

SLOW_POLL = 30.0
WAIT = 10.0


class Num(BaseModel):
    n: int


GATES: dict[int, asyncio.Event] = {}
ENTERED: dict[int, asyncio.Event] = {}


@define_stage(id="gated", input=Num, output=Num)
async def gated(ctx):  # type: ignore[no-untyped-def]
    entered = ENTERED.get(ctx.input.n)
    if entered is not None:
        entered.set()
    gate = GATES.get(ctx.input.n)
    if gate is not None:
        await gate.wait()
    return ctx.input


WF = WorkflowBuilder("wake-wf", input=Num).pipe(gated).build()
ONE_AT_A_TIME = WorkflowBuilder("wake-limited", input=Num, concurrency=1).pipe(gated).build()
WORKFLOWS = [WF, ONE_AT_A_TIME]


def _libpq(url: str) -> str:
    return sync_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@asynccontextmanager
async def _listening(url: str, channel: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    async with await psycopg.AsyncConnection.connect(_libpq(url), autocommit=True) as conn:
        await conn.execute(f"LISTEN {channel}")
        yield conn


async def _heard(conn: psycopg.AsyncConnection[Any], quiet: float = 0.5) -> list[str]:
    """The payloads delivered so far (collected until ``quiet`` seconds pass without one)."""
    return [note.payload async for note in conn.notifies(timeout=quiet)]


async def _count(url: str, sql: str) -> int:
    async with await psycopg.AsyncConnection.connect(_libpq(url), autocommit=True) as conn:
        row = await (await conn.execute(sql)).fetchone()
    assert row is not None
    return int(row[0])


async def test_a_run_nobody_waits_for_elsewhere_ends_without_a_notify(postgres_url: str) -> None:
    """Start then ``result`` in one process: the waiter hears of the end in-process, so
    the ending commit sends no ``end:`` NOTIFY, and no event-feed NOTIFY either (no
    reader is announced): the database's listeners are not woken at all."""
    async with (
        await Engine.open(postgres_url, workflows=WORKFLOWS, auto_migrate=True) as engine,
        engine.worker(concurrency=2) as worker,
    ):
        # The worker is up and has a free slot: each start hands it the run. Its tick
        # holds the free slots for a claim while it runs, so the start-up tick is let
        # finish first (the next is 10 s away): no start below meets one.
        await worker.tick()
        assert await (await engine.start("wake-wf", {"n": 0})).result(timeout=WAIT) == {"n": 0}
        async with (
            _listening(postgres_url, "treadle_jobs") as jobs,
            _listening(postgres_url, "treadle_events") as events,
        ):
            for n in range(1, 4):
                handle = await engine.start("wake-wf", {"n": n})
                assert await handle.result(timeout=WAIT) == {"n": n}
            assert [p for p in await _heard(jobs) if p.startswith("end:")] == []
            assert await _heard(events, quiet=0.1) == []
        assert await _count(postgres_url, "SELECT count(*) FROM run_end_waiters") == 0


async def test_a_marked_run_notifies_its_end_once_and_the_mark_goes(postgres_url: str) -> None:
    """Two runs end in one commit; only the one marked by ``mark_run_end`` is NOTIFYed
    (``end:<id>``), and its mark goes with the end. A run already ended gets no mark."""
    async with (
        await Engine.open(postgres_url, workflows=WORKFLOWS, auto_migrate=True) as engine,
        _listening(postgres_url, "treadle_jobs") as jobs,
    ):
        assert engine.backend is not None
        persistence: Any = engine.backend.persistence
        marked = (await engine.start("wake-wf", {"n": 10})).run_id  # PENDING: no worker
        other = (await engine.start("wake-wf", {"n": 11})).run_id
        assert await persistence.mark_run_end(marked) == "PENDING"
        await _heard(jobs, quiet=0.1)  # the starts' own wake-ups
        async with await psycopg.AsyncConnection.connect(_libpq(postgres_url)) as ending:
            await ending.execute(
                "UPDATE runs SET status = 'COMPLETED' WHERE id IN (%s, %s)", (marked, other)
            )
            await ending.commit()
        assert await _heard(jobs) == [f"end:{marked}"]
        assert await _count(postgres_url, "SELECT count(*) FROM run_end_waiters") == 0
        assert await persistence.mark_run_end(other) == "COMPLETED"
        assert await _count(postgres_url, "SELECT count(*) FROM run_end_waiters") == 0


async def test_a_mark_racing_an_uncommitted_end_waits_for_it(postgres_url: str) -> None:
    """The race the row lock closes: a run's end is written but not committed when a
    waiter marks it. The mark cannot see the end yet and the end's trigger ran before the
    mark, so neither side would act; instead the mark waits on the run's row until the
    end commits, and then reads it as ended."""
    async with await Engine.open(postgres_url, workflows=WORKFLOWS, auto_migrate=True) as engine:
        assert engine.backend is not None
        persistence: Any = engine.backend.persistence
        run_id = (await engine.start("wake-wf", {"n": 20})).run_id
        async with await psycopg.AsyncConnection.connect(_libpq(postgres_url)) as ending:
            await ending.execute("UPDATE runs SET status = 'COMPLETED' WHERE id = %s", (run_id,))
            marking = asyncio.ensure_future(persistence.mark_run_end(run_id))
            deadline = time.monotonic() + WAIT
            while not await _count(  # the marker's backend is waiting for the row lock
                postgres_url,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE '%run_end_waiters%'",
            ):
                assert time.monotonic() < deadline, "the mark never waited for the lock"
                assert not marking.done()
            assert not marking.done()
            await ending.commit()
        assert await asyncio.wait_for(marking, WAIT) == "COMPLETED"


async def test_a_waiter_in_another_process_is_woken_through_its_mark(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``result`` on an engine whose worker does not run the run (the runner is another
    engine): its first read marks the run, the runner's ending commit NOTIFYs it, and
    the answer comes with no further poll (the next is a minute away)."""
    from treadle import engine as engine_module

    monkeypatch.setattr(engine_module, "_RESULT_FIRST_POLL", 60.0)
    monkeypatch.setattr(engine_module, "_RESULT_MAX_POLL", 60.0)
    GATES[30] = gate = asyncio.Event()
    ENTERED[30] = entered = asyncio.Event()
    async with (
        await Engine.open(postgres_url, workflows=WORKFLOWS, auto_migrate=True) as runner,
        await Engine.open(postgres_url, workflows=WORKFLOWS) as waiter,
        runner.worker(concurrency=1),
    ):
        run_id = (await runner.start("wake-wf", {"n": 30})).run_id
        await asyncio.wait_for(entered.wait(), WAIT)
        waiting = asyncio.ensure_future(waiter.handle(run_id).result())
        deadline = time.monotonic() + WAIT
        while not await _count(postgres_url, "SELECT count(*) FROM run_end_waiters"):
            assert time.monotonic() < deadline, "the waiter never marked its run"
        assert not waiting.done()
        gate.set()
        assert await asyncio.wait_for(waiting, WAIT) == {"n": 30}
        listener = waiter.backend.wake_source if waiter.backend else None
        assert isinstance(listener, PgJobListener)
        assert listener.notifications >= 1


async def test_a_worker_waiting_for_a_slot_hears_another_processs_run_end(
    postgres_url: str,
) -> None:
    """A workflow admits one run at a time. The first runs on engine A; B's worker (polls
    every 30 s) claims the second, finds the limit full and marks ``*``, so A's ending
    commit NOTIFYs the end and B starts the second run long before its next poll."""
    GATES[40] = gate = asyncio.Event()
    ENTERED[40], ENTERED[41] = asyncio.Event(), asyncio.Event()
    slow = {"job_poll_interval": SLOW_POLL, "orchestration_interval": SLOW_POLL}
    async with (
        await Engine.open(postgres_url, workflows=WORKFLOWS, auto_migrate=True) as a,
        await Engine.open(postgres_url, workflows=WORKFLOWS) as b,
        a.worker(concurrency=1, **slow),
    ):
        first = await a.start("wake-limited", {"n": 40})
        await asyncio.wait_for(ENTERED[40].wait(), WAIT)
        async with b.worker(concurrency=1, **slow):
            second = await b.start("wake-limited", {"n": 41})
            deadline = time.monotonic() + WAIT
            while not await _count(
                postgres_url,
                "SELECT count(*) FROM run_end_waiters WHERE run_id = '*' AND expires_at > now()",
            ):
                assert time.monotonic() < deadline, "B never asked for run ends"
            assert not ENTERED[41].is_set()
            gate.set()
            assert await first.result(timeout=WAIT) == {"n": 40}
            await asyncio.wait_for(ENTERED[41].wait(), SLOW_POLL / 3)
            assert await second.result(timeout=WAIT) == {"n": 41}
