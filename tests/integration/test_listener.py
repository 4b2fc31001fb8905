"""LISTEN/NOTIFY on PostgreSQL: an idle worker wakes for work committed elsewhere.

The worker under test polls every 30 s, so a pickup within a couple of seconds can
only come from the notification. Events, not sleeps, synchronise: the stage body
sets one when it starts.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg
import pytest
from pydantic import BaseModel

from treadle import Engine, WorkflowBuilder, define_stage
from treadle.adapters.sql import PgJobListener, sync_url

pytestmark = pytest.mark.postgres

SLOW_POLL = 30.0


class Num(BaseModel):
    n: int


ENTERED: dict[int, asyncio.Event] = {}


@define_stage(id="mark", input=Num, output=Num)
async def mark(ctx):  # type: ignore[no-untyped-def]
    ENTERED[ctx.input.n].set()
    return ctx.input


WF = WorkflowBuilder("listen-wf", input=Num).pipe(mark).build()


def _libpq(url: str) -> str:
    return sync_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def test_listener_calls_subscribers_on_notify(postgres_url: str) -> None:
    """A NOTIFY committed by another connection reaches every subscriber."""
    listener = PgJobListener(postgres_url)
    woke = asyncio.Event()
    calls: list[str] = []

    def on_wake(kind: str) -> None:
        calls.append(kind)
        woke.set()

    listener.subscribe(on_wake)
    try:
        await listener.wait_listening()
        await asyncio.wait_for(woke.wait(), 5)  # the catch-up wake after connecting
        woke.clear()
        async with await psycopg.AsyncConnection.connect(
            _libpq(postgres_url), autocommit=True
        ) as other:
            await other.execute("NOTIFY treadle_jobs, 'jobs'")
        await asyncio.wait_for(woke.wait(), 5)
        assert listener.notifications >= 1
        assert calls == ["", "jobs"]  # the catch-up wake after connecting, then the kind
    finally:
        await listener.aclose()
    assert not listener.listening


async def test_listener_reconnects_after_connection_is_killed(
    postgres_url: str, pg_admin_connect: Any
) -> None:
    """pg_terminate_backend on the listening connection: it reconnects, wakes subscribers
    once (notifications may have been lost) and keeps delivering."""
    listener = PgJobListener(postgres_url, initial_backoff=0.01)
    reconnected = asyncio.Event()
    notified = asyncio.Event()

    def on_wake(kind: str) -> None:
        if listener.connections >= 2:
            reconnected.set()
        if listener.notifications:
            notified.set()

    listener.subscribe(on_wake)
    try:
        await listener.wait_listening()
        pid = listener.backend_pid
        assert pid is not None
        with pg_admin_connect() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        await asyncio.wait_for(reconnected.wait(), 10)
        assert listener.backend_pid not in (None, pid)
        async with await psycopg.AsyncConnection.connect(
            _libpq(postgres_url), autocommit=True
        ) as other:
            await other.execute("NOTIFY treadle_jobs")
        await asyncio.wait_for(notified.wait(), 10)
    finally:
        await listener.aclose()


async def test_idle_worker_picks_up_run_started_by_another_engine(postgres_url: str) -> None:
    """A worker polling every 30 s runs a job started through a different engine (its own
    connection pool, as another process would have) well before the poll interval."""
    worker_engine = await Engine.open(postgres_url, workflows=[WF], auto_migrate=True)
    client = await Engine.open(postgres_url, workflows=[WF])
    latencies: list[float] = []
    try:
        listener = worker_engine.backend.wake_source if worker_engine.backend else None
        assert isinstance(listener, PgJobListener)
        async with worker_engine.worker(
            concurrency=2, job_poll_interval=SLOW_POLL, orchestration_interval=SLOW_POLL
        ):
            await listener.wait_listening()
            for n in range(5):
                ENTERED[n] = asyncio.Event()
                started = time.monotonic()
                handle = await client.start("listen-wf", {"n": n})
                await asyncio.wait_for(ENTERED[n].wait(), SLOW_POLL / 3)
                latencies.append(time.monotonic() - started)
                assert await handle.result(timeout=10) == {"n": n}
        assert listener.notifications >= 5
    finally:
        await client.aclose()
        await worker_engine.aclose()
    # Far below the 30 s poll: only the notification can explain it.
    assert sorted(latencies)[len(latencies) // 2] < 1.0, latencies


async def test_notifications_from_the_listeners_own_pool_are_dropped(postgres_url: str) -> None:
    """A run started through the worker's own engine wakes it in-process; the echo of that
    engine's NOTIFY is ignored, while another engine's is delivered."""
    engine = await Engine.open(postgres_url, workflows=[WF], auto_migrate=True)
    other = await Engine.open(postgres_url, workflows=[WF])
    try:
        listener = engine.backend.wake_source if engine.backend else None
        assert isinstance(listener, PgJobListener)
        kinds: list[str] = []
        seen = asyncio.Event()

        def on_wake(kind: str) -> None:
            kinds.append(kind)
            if kind == "run":
                seen.set()

        listener.subscribe(on_wake)
        await listener.wait_listening()
        ENTERED[100] = asyncio.Event()
        ENTERED[101] = asyncio.Event()
        await engine.start("listen-wf", {"n": 100})  # own pool: dropped
        await other.start("listen-wf", {"n": 101})  # another pool: delivered
        await asyncio.wait_for(seen.wait(), 5)
        assert listener.ignored >= 1
        assert kinds.count("run") == 1
    finally:
        await other.aclose()
        await engine.aclose()


async def test_one_notify_per_transaction_and_none_for_a_job_taken_by_its_enqueuer(
    postgres_url: str,
) -> None:
    """Two enqueues in one transaction send one ``NOTIFY`` (one round trip, one
    notification); enqueuing only a job leased to the enqueuing worker sends none."""
    from datetime import UTC, datetime

    import sqlalchemy as sa

    from treadle.adapters.sql import SqlJobTransport, SqlPersistence
    from treadle.kernel.model import Job, JobStatus

    persistence = await SqlPersistence.open(postgres_url, migrate=True)
    transport = SqlJobTransport(persistence)
    notifies: list[str] = []
    sa.event.listen(
        persistence.engine.sync_engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, *rest: (
            notifies.append(statement) if statement.startswith("NOTIFY") else None
        ),
    )
    now = datetime.now(UTC)

    def job(job_id: str, **fields: Any) -> Job:
        return Job(
            id=job_id,
            workflow_run_id="r1",
            workflow_id="wf",
            stage_id=job_id,
            next_poll_at=now,
            enqueued_at=now,
            **fields,
        )

    listening = await psycopg.AsyncConnection.connect(_libpq(postgres_url), autocommit=True)
    try:
        await listening.execute("LISTEN treadle_jobs")
        async with persistence.transaction() as tx:
            await transport.enqueue(tx, [job("a")])
            await transport.enqueue(tx, [job("b")])
        assert len(notifies) == 1
        received = [n.payload async for n in listening.notifies(timeout=2.0)]
        assert received == ["jobs"]
        notifies.clear()
        async with persistence.transaction() as tx:
            leased = job("c", status=JobStatus.LEASED, worker_id="w1", attempts=1, heartbeat_at=now)
            await transport.enqueue(tx, [leased])
        assert notifies == []
        assert [n async for n in listening.notifies(timeout=0.5)] == []
    finally:
        await listening.close()
        await persistence.aclose()


async def test_no_session_outlives_engine_close(postgres_url: str) -> None:
    """After ``Engine.aclose()`` returns, the listener's connection is closed too, even
    when its last subscriber (the worker, a result waiter) left before the engine closed:
    a caller that then blocks the loop (a sync check, a benchmark's reading) must not
    find a session still on the database."""
    engine = await Engine.open(postgres_url, workflows=[WF], auto_migrate=True)
    async with engine.worker(concurrency=1):
        listener = engine.backend.wake_source if engine.backend else None
        assert isinstance(listener, PgJobListener)
        await listener.wait_listening()
        pid = listener.backend_pid
        ENTERED[7] = asyncio.Event()
        handle = await engine.start("listen-wf", {"n": 7})
        assert await handle.result(timeout=10) == {"n": 7}  # a run-end watcher too
    await engine.aclose()
    # No await between the close and the check: the loop gets no chance to finish it.
    with psycopg.connect(_libpq(postgres_url), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
        count = row.fetchone()
    assert count is not None
    deadline = time.monotonic() + 5
    while count[0] and time.monotonic() < deadline:  # the server reaps a closed backend
        time.sleep(0.01)  # noqa: ASYNC251 - deliberately blocking: the loop must not help
        with psycopg.connect(_libpq(postgres_url), autocommit=True) as conn:
            count = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
            assert count is not None
    assert count[0] == 0
