"""Dialect-specific behaviour of the SQL adapters that the shared contract suites
cannot see: migrations, SQLite's single-writer locking across processes' worth of
connections, PostgreSQL's SKIP LOCKED queue, connection loss, and error translation."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import exc as sa_exc

from treadle.adapters.sql import (
    SqlJobTransport,
    SqlPersistence,
    current_revision,
    head_revision,
    migrate,
    sync_url,
)
from treadle.adapters.sql import schema as t
from treadle.adapters.sql.schema import VERSION_TABLE, metadata
from treadle.kernel.errors import DuplicateError, TransientStorageError
from treadle.kernel.events import WorkflowCreated
from treadle.kernel.model import Job, Run, RunStatus, StageRun

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def make_run(run_id: str, **fields: Any) -> Run:
    return Run(id=run_id, workflow_id="wf", created_at=T0, updated_at=T0, **fields)


def make_job(job_id: str, run_id: str = "r1", **fields: Any) -> Job:
    return Job(
        id=job_id,
        workflow_run_id=run_id,
        workflow_id="wf",
        stage_id="s",
        next_poll_at=T0,
        enqueued_at=T0,
        **fields,
    )


async def open_migrated(url: str) -> SqlPersistence:
    return await SqlPersistence.open(url, migrate=True)


# -- migrations ------------------------------------------------------------------------

_PG_ONLY_INDEX = "ix_runs_search_attributes"


def _schema_differences(url: str) -> list[Any]:
    engine = sa.create_engine(sync_url(url), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"version_table": VERSION_TABLE, "compare_type": True}
            )
            diffs = compare_metadata(context, metadata)
    finally:
        engine.dispose()
    if url.startswith("sqlite"):
        # SQLite's reflection does not report DESC index columns: those two indexes
        # always look "changed" there although the DDL has DESC (checked on PostgreSQL).
        noisy = {"ix_jobs_dequeue", "ix_runs_claim"}
        diffs = [
            d for d in diffs if not (d[0] in ("add_index", "remove_index") and d[1].name in noisy)
        ]
        # The GIN index on runs.search_attributes is PostgreSQL-only (migration 0003).
        diffs = [d for d in diffs if not (d[0] == "add_index" and d[1].name == _PG_ONLY_INDEX)]
    return list(diffs)


def test_migrate_is_idempotent_and_reaches_head(database_url: str) -> None:
    """An empty database has no revision; migrate() twice lands on head, matching the
    schema the adapters query, with nothing left for a further migration to do."""
    assert current_revision(database_url) is None
    migrate(database_url)
    assert current_revision(database_url) == head_revision()
    migrate(database_url)
    assert current_revision(database_url) == head_revision()
    assert _schema_differences(database_url) == []


async def test_open_with_migrate_creates_a_usable_database(database_url: str) -> None:
    persistence = await open_migrated(database_url)
    try:
        async with persistence.transaction() as tx:
            await tx.runs.insert(make_run("r1"))
        async with persistence.transaction() as tx:
            run = await tx.runs.get("r1")
        assert run is not None
        assert run.created_at == T0
        assert run.created_at.tzinfo is not None
    finally:
        await persistence.aclose()


# -- error translation ---------------------------------------------------------------


async def test_unique_violation_is_duplicate_error(database_url: str) -> None:
    """Both the adapter's own duplicate checks and a raw unique violation from the
    driver surface as DuplicateError, keeping the driver error as the cause."""
    persistence = await open_migrated(database_url)
    try:
        async with persistence.transaction() as tx:
            await tx.runs.insert(make_run("r1", idempotency_key="k"))
        with pytest.raises(DuplicateError):
            async with persistence.transaction() as tx:
                await tx.runs.insert(make_run("r1"))
        with pytest.raises(DuplicateError):
            async with persistence.transaction() as tx:
                await tx.runs.insert(make_run("r2", idempotency_key="k"))
        row = {c.name: getattr(make_run("r1"), c.name) for c in t.runs.columns}
        row["status"] = row["status"].value

        async def raw_insert() -> None:
            async with persistence.transaction() as tx:
                await tx.execute(sa.insert(t.runs).values(row))

        with pytest.raises(DuplicateError) as caught:
            await raw_insert()
        assert isinstance(caught.value.__cause__, sa_exc.IntegrityError)
    finally:
        await persistence.aclose()


async def test_a_caught_duplicate_does_not_spoil_the_transaction(database_url: str) -> None:
    """On PostgreSQL a failed statement aborts the whole transaction; the adapter's
    inserts avoid that, so work around a caught DuplicateError still commits."""
    persistence = await open_migrated(database_url)
    transport = SqlJobTransport(persistence)
    try:
        async with persistence.transaction() as tx:
            await tx.runs.insert(make_run("r1"))
            await transport.enqueue(tx, [make_job("j1")])
        async with persistence.transaction() as tx:
            with pytest.raises(DuplicateError):
                await tx.runs.insert(make_run("r1"))
            with pytest.raises(DuplicateError):
                await transport.enqueue(tx, [make_job("j1")])
            await tx.runs.insert(make_run("r2"))
        async with persistence.transaction() as tx:
            assert await tx.runs.get("r2") is not None
    finally:
        await persistence.aclose()


# -- SQLite ------------------------------------------------------------------------------


async def test_two_sqlite_persistences_write_concurrently(sqlite_url: str) -> None:
    """Two engines on one file (a worker and a CLI) interleave write transactions
    without 'database is locked', and their event sequences stay gap-free."""
    migrate(sqlite_url)
    first = await SqlPersistence.open(sqlite_url)
    second = await SqlPersistence.open(sqlite_url)
    try:
        async with first.transaction() as tx:
            await tx.runs.insert(make_run("shared"))

        async def writer(persistence: SqlPersistence, prefix: str) -> None:
            for i in range(25):
                async with persistence.transaction() as tx:
                    # Read first, then write: the pattern BEGIN IMMEDIATE protects.
                    run = await tx.runs.get("shared")
                    assert run is not None
                    await tx.runs.insert(make_run(f"{prefix}-{i}"))
                    await tx.outbox.append(
                        [
                            WorkflowCreated(
                                workflow_run_id="shared", timestamp=T0, workflow_id="wf", priority=5
                            )
                        ]
                    )

        await asyncio.gather(
            *(
                writer(p, f"{name}{n}")
                for p, name in ((first, "a"), (second, "b"))
                for n in range(3)
            )
        )
        async with second.transaction() as tx:
            events = await tx.outbox.events_for_run("shared")
            counts = await tx.runs.count("status", _all())
        assert [e.sequence for e in events] == list(range(1, 151))
        assert counts == {"PENDING": 151}
    finally:
        await first.aclose()
        await second.aclose()


def _all() -> Any:
    from treadle.kernel.model import RunFilter

    return RunFilter(limit=1000)


async def test_sqlite_runs_in_wal_mode(sqlite_url: str) -> None:
    """WAL, and a busy timeout of at least 5 s: the inline driver's own (it waits for a
    lock with asyncio sleeps), SQLite's busy handler being off (it would sleep on the
    event loop's thread)."""
    persistence = await open_migrated(sqlite_url)
    try:
        async with persistence.transaction() as tx:
            mode = (await tx.execute(sa.text("PRAGMA journal_mode"))).scalar_one()
            timeout = (await tx.execute(sa.text("PRAGMA busy_timeout"))).scalar_one()
            raw = await tx.connection.get_raw_connection()
            own_timeout = raw.dbapi_connection.busy_timeout  # type: ignore[union-attr]
        assert str(mode).lower() == "wal"
        assert int(timeout) == 0
        assert own_timeout >= 5
    finally:
        await persistence.aclose()


# -- PostgreSQL -------------------------------------------------------------------------------


@pytest.mark.postgres
async def test_concurrent_dequeues_never_lease_a_job_twice(postgres_url: str) -> None:
    """Two engines, several workers each, racing over one queue: SKIP LOCKED hands
    every job to exactly one of them."""
    migrate(postgres_url)
    one = await SqlPersistence.open(postgres_url)
    two = await SqlPersistence.open(postgres_url)
    try:
        async with one.transaction() as tx:
            await SqlJobTransport(one).enqueue(
                tx, [make_job(f"j{i:03}", priority=i % 3) for i in range(150)]
            )
        leased: list[str] = []

        async def worker(persistence: SqlPersistence, worker_id: str) -> None:
            transport = SqlJobTransport(persistence)
            while True:
                jobs = await transport.dequeue(worker_id, T0 + timedelta(seconds=1), limit=4)
                if not jobs:
                    return
                assert all(j.attempts == 1 and j.worker_id == worker_id for j in jobs)
                leased.extend(j.id for j in jobs)

        await asyncio.gather(
            *(worker(p, f"{name}{n}") for p, name in ((one, "a"), (two, "b")) for n in range(4))
        )
        assert len(leased) == 150
        assert len(set(leased)) == 150
    finally:
        await one.aclose()
        await two.aclose()


@pytest.mark.postgres
async def test_concurrent_appends_keep_sequences_gap_free(postgres_url: str) -> None:
    migrate(postgres_url)
    one = await SqlPersistence.open(postgres_url)
    two = await SqlPersistence.open(postgres_url)
    try:

        async def append(persistence: SqlPersistence) -> None:
            for _ in range(20):
                async with persistence.transaction() as tx:
                    await tx.outbox.append(
                        [
                            WorkflowCreated(
                                workflow_run_id="r", timestamp=T0, workflow_id="wf", priority=5
                            )
                        ]
                        * 2
                    )

        await asyncio.gather(*(append(p) for p in (one, two, one, two)))
        async with one.transaction() as tx:
            events = await tx.outbox.events_for_run("r")
        assert [e.sequence for e in events] == list(range(1, 161))
    finally:
        await one.aclose()
        await two.aclose()


@pytest.mark.postgres
async def test_terminated_backend_fails_only_the_operation_in_flight(
    postgres_url: str, pg_admin_connect: Any
) -> None:
    """pg_terminate_backend on the connection running a statement: that statement (and
    its transaction) fails with TransientStorageError; the next operation works."""
    persistence = await open_migrated(postgres_url)
    try:
        async with persistence.transaction() as tx:
            await tx.runs.insert(make_run("kept"))
        running = asyncio.Event()
        pids: list[int] = []

        async def victim() -> None:
            async with persistence.transaction() as tx:
                pids.append((await tx.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one())
                await tx.runs.insert(make_run("lost"))
                running.set()
                await tx.execute(sa.text("SELECT pg_sleep(20)"))

        task = asyncio.create_task(victim())
        await running.wait()
        await asyncio.sleep(0.2)  # let pg_sleep start on the server
        with pg_admin_connect() as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pids[0],))
        with pytest.raises(TransientStorageError) as caught:
            await task
        assert isinstance(caught.value.__cause__, sa_exc.DBAPIError)

        async with persistence.transaction() as tx:
            assert await tx.runs.get("kept") is not None
            assert await tx.runs.get("lost") is None  # the victim's transaction rolled back

        # An idle pooled connection killed behind the pool's back is replaced on checkout.
        # The timeout makes pg_terminate_backend wait until the backend has exited (its
        # socket closed): without it, under load, the checkout could race the kill.
        with pg_admin_connect() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = %s",
                (sa.make_url(postgres_url).database,),
            )
        async with persistence.transaction() as tx:
            assert await tx.runs.get("kept") is not None
    finally:
        await persistence.aclose()


@pytest.mark.postgres
async def test_claim_pending_runs_skips_rows_locked_by_another_claimer(postgres_url: str) -> None:
    migrate(postgres_url)
    one = await SqlPersistence.open(postgres_url)
    two = await SqlPersistence.open(postgres_url)
    try:
        async with one.transaction() as tx:
            for i in range(4):
                await tx.runs.insert(make_run(f"r{i}", priority=i))
        async with one.transaction() as tx1:
            first = await tx1.runs.claim_pending(2)
            async with two.transaction() as tx2:
                second = await tx2.runs.claim_pending(10)
        assert [r.id for r in first] == ["r3", "r2"]
        assert [r.id for r in second] == ["r1", "r0"]
        assert all(r.status is RunStatus.PENDING for r in first + second)
    finally:
        await one.aclose()
        await two.aclose()


# -- URLs and the filesystem blob store ---------------------------------------------------


@pytest.mark.parametrize(
    ("given", "async_driver", "sync_driver"),
    [
        ("sqlite:///treadle.db", "sqlite+treadle", "sqlite"),
        ("sqlite+pysqlite:///treadle.db", "sqlite+treadle", "sqlite"),
        ("sqlite+aiosqlite:///treadle.db", "sqlite+aiosqlite", "sqlite"),
        ("postgresql://u@h/db", "postgresql+psycopg", "postgresql+psycopg"),
        ("postgres://u@h/db", "postgresql+psycopg", "postgresql+psycopg"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg", "postgresql+psycopg"),
    ],
)
def test_user_urls_are_normalised(given: str, async_driver: str, sync_driver: str) -> None:
    from treadle.adapters.sql import async_url

    assert async_url(given).drivername == async_driver
    assert sync_url(given).drivername == sync_driver
    assert async_url(given).database == sa.make_url(given).database


def test_unsupported_urls_are_rejected() -> None:
    from treadle.adapters.sql import async_url

    with pytest.raises(ValueError, match="unsupported database URL"):
        async_url("mysql://u@h/db")


async def test_filesystem_blob_keys_stay_inside_the_root(tmp_path: Any) -> None:
    """Keys are data, not paths: ``..``, dotfiles, empty and over-long segments all map
    to files under the root and list back exactly."""
    from treadle.adapters.filesystem import FileSystemBlobStore

    store = FileSystemBlobStore(tmp_path / "root")
    keys = ["../escape", "a/../../b", ".hidden", "a//b", "a/", "x" * 400, "a", "a/b", "%2E"]
    for i, key in enumerate(keys):
        await store.put(key, str(i).encode())
    for i, key in enumerate(keys):
        assert await store.get(key) == str(i).encode()
        assert await store.has(key)
    assert await store.list() == sorted(keys)
    assert all(p.is_relative_to(tmp_path / "root") for p in (tmp_path).rglob("*"))
    assert not (tmp_path / "escape").exists()
    assert await store.delete("x" * 400)
    assert not await store.has("x" * 400)
    assert await store.list() == sorted(k for k in keys if k != "x" * 400)


async def test_sqlite_readers_do_not_wait_for_a_writer(sqlite_url: str) -> None:
    """WAL + a DEFERRED read transaction: a read-only transaction proceeds while another
    connection holds the write lock, and sees only committed data."""
    persistence = await open_migrated(sqlite_url)
    try:
        async with persistence.transaction() as writer:
            await writer.runs.insert(make_run("uncommitted"))
            async with persistence.transaction(read_only=True) as reader:
                assert await reader.runs.get("uncommitted") is None
        async with persistence.transaction(read_only=True) as reader:
            assert await reader.runs.get("uncommitted") is not None
    finally:
        await persistence.aclose()


def test_json_columns_decode_null_text_and_bytes_alike() -> None:
    """The JSON loader both drivers use: JSON ``null`` is ``None`` without the parser,
    bytes (psycopg) and text (SQLite) decode to the same values, non-ASCII included."""
    from treadle.adapters.sql.engine import load_json

    assert load_json(b"null") is None
    assert load_json("null") is None
    value = {"café": [1, 2.5, None, True, {"ü": "ß"}], "big": 2**70}
    import json

    text = json.dumps(value, ensure_ascii=False)
    assert load_json(text) == value
    assert load_json(text.encode()) == value
    assert load_json(b'"null"') == "null"  # the string, not the JSON null


async def test_a_stored_stage_with_an_unknown_status_is_refused(database_url: str) -> None:
    """Stage rows are built without pydantic's validation (the column types give each
    field its type); the status text is still checked."""
    persistence = await SqlPersistence.open(database_url, migrate=True)
    try:
        async with persistence.transaction() as tx:
            await tx.runs.insert(make_run("r1"))
            await tx.stages.insert_many(
                [StageRun(workflow_run_id="r1", stage_id="s", execution_group=0)]
            )
            await tx.execute(sa.update(t.stages).values(status="EXPLODED"))
        async with persistence.transaction() as tx:
            with pytest.raises(ValueError, match="EXPLODED"):
                await tx.stages.for_run("r1")
    finally:
        await persistence.aclose()
