"""PostgreSQL serves ``list_runs(attributes=...)`` from a GIN index (migration 0003):
the adapter's query uses JSONB containment so the planner can use it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from treadle.adapters.sql import SqlPersistence, migrate
from treadle.kernel.model import Run, RunFilter

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _run(i: int, **attributes: Any) -> Run:
    at = T0 + timedelta(seconds=i)
    return Run(
        id=f"r{i:04d}", workflow_id="wf", created_at=at, updated_at=at, search_attributes=attributes
    )


async def test_search_attributes_gin_index_exists_and_serves_list_filters(
    postgres_url: str,
) -> None:
    """The index is there after migrating, and EXPLAIN of the query ``list_runs`` really
    runs (captured from the driver) uses it once sequential scans are discouraged."""
    migrate(postgres_url)
    persistence = await SqlPersistence.open(postgres_url)
    statements: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if "FROM runs" in statement and "@>" in statement:
            statements.append((statement, params))

    try:
        async with persistence.transaction() as tx:
            for i in range(200):
                await tx.runs.insert(_run(i, customer=f"c{i % 20}", tier=i % 3))
        sa.event.listen(persistence.engine.sync_engine, "before_cursor_execute", capture)
        async with persistence.transaction() as tx:
            found = await tx.runs.query(RunFilter(attributes={"customer": "c7", "tier": 1}))
        sa.event.remove(persistence.engine.sync_engine, "before_cursor_execute", capture)
        assert sorted(r.id for r in found) == ["r0007", "r0067", "r0127", "r0187"]
        assert len(statements) == 1, statements
        statement, params = statements[0]
        async with persistence.engine.connect() as conn:
            index = await conn.execute(
                sa.text(
                    "SELECT indexdef FROM pg_indexes WHERE tablename = 'runs' "
                    "AND indexname = 'ix_runs_search_attributes'"
                )
            )
            indexdef = index.scalar_one()
            assert "USING gin" in indexdef
            assert "jsonb_path_ops" in indexdef
            await conn.execute(sa.text("ANALYZE runs"))
            await conn.execute(sa.text("SET enable_seqscan = off"))
            raw = await conn.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None
            cursor = driver.cursor()
            await cursor.execute("EXPLAIN " + statement, params)
            plan = "\n".join(row[0] for row in await cursor.fetchall())
        assert "ix_runs_search_attributes" in plan, plan
    finally:
        await persistence.aclose()
