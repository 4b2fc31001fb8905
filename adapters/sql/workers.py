"""SQL WorkerRegistry: the ``workers`` table, and queue depths counted from ``jobs``.

Each call is its own short transaction on the persistence's connections (like the job
transport's ``dequeue``): a beat must never wait on, or roll back with, a run's commit.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite

import treadle.adapters.sql.schema as t
from treadle.adapters.sql.errors import translate
from treadle.adapters.sql.persistence import SqlPersistence
from treadle.kernel.model import JobStatus, QueueDepth, WorkerInfo

_LIVE_JOB_STATUSES = (JobStatus.QUEUED.value, JobStatus.LEASED.value)


class SqlWorkerRegistry:
    """The WorkerRegistry port on the tables of the ``SqlPersistence`` it shares."""

    def __init__(self, persistence: SqlPersistence) -> None:
        self.persistence = persistence

    async def _run(self, stmt: Any, what: str, *, read_only: bool = False) -> Any:
        async with self.persistence.connect(read_only=read_only) as conn:
            try:
                return await conn.execute(stmt)
            except sa_exc.SQLAlchemyError as exc:
                raise translate(exc, what) from exc

    async def beat(self, worker: WorkerInfo) -> None:
        values = {
            "worker_id": worker.worker_id,
            "queues": list(worker.queues),
            "host": worker.host,
            "pid": worker.pid,
            "started_at": worker.started_at,
            "heartbeat_at": worker.heartbeat_at,
        }
        dialect = postgresql if self.persistence.is_postgres else sqlite
        insert = dialect.insert(t.workers).values(values)
        stmt = insert.on_conflict_do_update(
            index_elements=[t.workers.c.worker_id],
            set_={"queues": insert.excluded.queues, "heartbeat_at": insert.excluded.heartbeat_at},
        )
        await self._run(stmt, "worker beat")

    async def leave(self, worker_id: str) -> None:
        await self._run(
            sa.delete(t.workers).where(t.workers.c.worker_id == worker_id), "worker leave"
        )

    async def list_workers(self) -> list[WorkerInfo]:
        query = sa.select(t.workers).order_by(t.workers.c.heartbeat_at.desc())
        rows = (await self._run(query, "list workers", read_only=True)).all()
        return [
            WorkerInfo(
                worker_id=row.worker_id,
                queues=tuple(row.queues),
                host=row.host,
                pid=row.pid,
                started_at=row.started_at,
                heartbeat_at=row.heartbeat_at,
            )
            for row in rows
        ]

    async def prune(self, older_than: datetime) -> int:
        result = await self._run(
            sa.delete(t.workers).where(t.workers.c.heartbeat_at < older_than), "prune workers"
        )
        return int(result.rowcount or 0)

    async def queue_depths(self, now: datetime) -> list[QueueDepth]:
        c = t.jobs.c
        due = sa.and_(c.status == JobStatus.QUEUED.value, c.next_poll_at <= now)
        query = (
            sa.select(
                c.queue,
                sa.func.count().filter(due).label("queued"),
                sa.func.count()
                .filter(sa.and_(c.status == JobStatus.QUEUED.value, c.next_poll_at > now))
                .label("scheduled"),
                sa.func.count().filter(c.status == JobStatus.LEASED.value).label("leased"),
                sa.func.min(c.next_poll_at).filter(due).label("oldest_due_at"),
            )
            .where(c.status.in_(_LIVE_JOB_STATUSES))
            .group_by(c.queue)
            .order_by(c.queue)
        )
        rows = (await self._run(query, "queue depths", read_only=True)).all()
        return [
            QueueDepth(
                queue=row.queue,
                queued=row.queued,
                scheduled=row.scheduled,
                leased=row.leased,
                oldest_due_at=row.oldest_due_at,
            )
            for row in rows
        ]
