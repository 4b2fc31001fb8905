"""Costs on the hot path that the throughput benchmark depends on (issue 3, req. 9)."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from treadle.adapters.sql import SqlPersistence, sync_url

pytestmark = pytest.mark.postgres


def _xact_commit(url: str) -> int:
    import psycopg

    libpq = sync_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        row = conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    assert row is not None
    return int(row[0])


async def test_a_transaction_costs_one_server_commit(postgres_url: str) -> None:
    """No pre-ping transaction per checkout: 50 units of work are 50 server commits (the
    liveness check on checkout needs no round trip)."""
    persistence = await SqlPersistence.open(postgres_url, migrate=True)
    await persistence.aclose()
    persistence = await SqlPersistence.open(postgres_url)
    before = _xact_commit(postgres_url)
    try:
        for _ in range(50):
            async with persistence.transaction() as tx:
                await tx.execute(sa.text("SELECT 1"))
    finally:
        await persistence.aclose()  # server processes exit and flush their statistics
    # A few more than 50: the probe's own statement and late-flushed statistics of the
    # migration's connections. A pre-ping per checkout would make it about 100.
    assert 50 <= _xact_commit(postgres_url) - before <= 56


async def test_a_pooled_connection_idle_past_the_threshold_is_pinged(
    postgres_url: str, pg_admin_connect: Any
) -> None:
    """With no FATAL message to see (idle_ping_after=0 pings every reuse), a connection
    the server dropped is replaced on checkout instead of failing the next operation."""
    from treadle.adapters.sql import create_engine
    from treadle.adapters.sql.engine import configure_postgres

    engine = create_engine(postgres_url, pool_pre_ping=False)  # no automatic check
    configure_postgres(engine, idle_ping_after=0.0)
    persistence = SqlPersistence(engine, owns_engine=True)
    try:
        async with persistence.transaction() as tx:
            pid = (await tx.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
        with pg_admin_connect() as admin:
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
        async with persistence.transaction() as tx:
            other = (await tx.execute(sa.text("SELECT pg_backend_pid()"))).scalar_one()
        assert other != pid
    finally:
        await persistence.aclose()
