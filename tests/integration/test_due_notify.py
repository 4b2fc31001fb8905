"""Commits that write timed work announce it: to this process's due watchers after the
commit (SQLite and PostgreSQL), and on PostgreSQL to other processes in one ``NOTIFY
treadle_jobs, 'due:...'`` per transaction, delivered on commit only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import sqlalchemy as sa

from treadle.adapters.due_times import parse_due
from treadle.adapters.sql import SqlJobTransport, SqlPersistence, SqlScheduler, sync_url
from treadle.kernel.model import Job

NOW = datetime.now(UTC).replace(microsecond=0)


def _job(job_id: str) -> Job:
    return Job(
        id=job_id,
        workflow_run_id="r1",
        workflow_id="wf",
        stage_id=job_id,
        next_poll_at=NOW,
        enqueued_at=NOW,
    )


async def _requeue_then_fail(persistence: SqlPersistence, transport: SqlJobTransport) -> None:
    async with persistence.transaction() as tx:
        await transport.requeue(tx, "a", NOW + timedelta(seconds=1))
        raise RuntimeError("rolled back")


def _libpq(url: str) -> str:
    return sync_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def test_commits_tell_this_processs_watchers_of_the_timed_work_they_wrote(
    database_url: str,
) -> None:
    """A retry's requeue, a delayed enqueue and a scheduled command each tell the
    watchers once committed, the earliest time per kind; a rollback tells nothing; an
    enqueue available now is not timed work."""
    persistence = await SqlPersistence.open(database_url, migrate=True)
    transport = SqlJobTransport(persistence)
    scheduler = SqlScheduler(persistence)
    heard: list[dict[str, datetime]] = []
    stop = persistence.watch_due(lambda due: heard.append(dict(due)))
    try:
        async with persistence.transaction() as tx:
            await transport.enqueue(tx, [_job("a"), _job("b")])
        assert heard == []  # available now: the "jobs" wake-up, not a due time
        async with persistence.transaction() as tx:
            await transport.requeue(tx, "a", NOW + timedelta(seconds=5), error="boom")
            await transport.requeue(tx, "b", NOW + timedelta(seconds=2), error="boom")
            assert heard == []  # not before the commit
        assert heard == [{"job": NOW + timedelta(seconds=2)}]
        delayed = _job("c").model_copy(update={"next_poll_at": NOW + timedelta(seconds=7)})
        async with persistence.transaction() as tx:
            await transport.enqueue(tx, [delayed])
        assert heard[-1] == {"job": NOW + timedelta(seconds=7)}
        await scheduler.schedule("k", {"type": "run.cancel"}, NOW + timedelta(seconds=3))
        assert heard[-1] == {"command": NOW + timedelta(seconds=3)}
        with pytest.raises(RuntimeError, match="rolled back"):
            await _requeue_then_fail(persistence, transport)
        assert len(heard) == 3
        stop()
        await scheduler.schedule("k2", {"type": "run.cancel"}, NOW)
        assert len(heard) == 3
    finally:
        await persistence.aclose()


@pytest.mark.postgres
async def test_other_processes_hear_one_due_notify_per_transaction(postgres_url: str) -> None:
    """Two retries and a command due in one transaction: one NOTIFY, sent as the
    transaction commits, with the earliest time of each kind."""
    persistence = await SqlPersistence.open(postgres_url, migrate=True)
    transport = SqlJobTransport(persistence)
    statements: list[str] = []
    sa.event.listen(
        persistence.engine.sync_engine,
        "before_cursor_execute",
        lambda conn, cursor, statement, *rest: statements.append(statement),
    )
    listening = await psycopg.AsyncConnection.connect(_libpq(postgres_url), autocommit=True)
    try:
        await listening.execute("LISTEN treadle_jobs")
        async with persistence.transaction() as tx:
            await transport.enqueue(tx, [_job("a"), _job("b")])
        assert [n.payload async for n in listening.notifies(timeout=1.0)] == ["jobs"]
        statements.clear()
        async with persistence.transaction() as tx:
            await transport.requeue(tx, "a", NOW + timedelta(seconds=5))
            await transport.requeue(tx, "b", NOW + timedelta(seconds=2))
            tx.note_due("command", NOW + timedelta(seconds=9))
        notifies = [s for s in statements if "pg_notify" in s]
        assert len(notifies) == 1
        received = [n.payload async for n in listening.notifies(timeout=1.0)]
        assert len(received) == 1
        assert parse_due(received[0]) == {
            "job": NOW + timedelta(seconds=2),
            "command": NOW + timedelta(seconds=9),
        }
    finally:
        await listening.close()
        await persistence.aclose()
