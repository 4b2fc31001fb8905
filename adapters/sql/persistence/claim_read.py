"""``tx.claim_candidates`` on PostgreSQL: what a ``run.claimPending`` needs, in ONE read.

The claim of a run started elsewhere used to read under locks (BEGIN, the PENDING runs
``FOR UPDATE SKIP LOCKED``, then each run's stages, its timers for a code workflow)
and write per kind (run, job, stage, events) before COMMIT: eight round trips. Here the
read is one statement, the claimable runs with their stages and whether they have a
timer::

    WITH c AS (SELECT runs.* FROM runs WHERE status = 'PENDING' AND NOT paused
               ORDER BY priority DESC, created_at, id LIMIT :limit
               FOR UPDATE SKIP LOCKED)
    SELECT c.* AS r_*, stages.* AS s_*, EXISTS (unfired timer of c) AS timed
    FROM c LEFT JOIN stages ON stages.run_id = c.id
    ORDER BY c.priority DESC, c.created_at, c.id, stages.execution_group, stages.ordinal

sent alone in autocommit when it is the transaction's first statement (no ``BEGIN``):
its row locks last only while it runs, so it skips runs another claim holds right now
but holds none itself. The claim's writes then go as one ``write_set`` statement (also
without ``BEGIN``/``COMMIT``) whose run update requires each run still to have the
version read here: a run claimed, cancelled or paused in between makes the whole
statement write nothing (``ConcurrencyError``), and the kernel claims again under locks.
Two round trips for the claim, instead of eight.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

import treadle.adapters.sql.schema as t
from treadle.adapters.sql.persistence.write_set import _alone, _transactional_again
from treadle.kernel.model import RunStatus

if TYPE_CHECKING:
    from treadle.adapters.sql.persistence.write_set import SqlTransactionUnit
    from treadle.kernel.model import Run, StageRun

__all__ = ["claim_candidates"]


def _candidates_sql(tx: Any) -> Any:
    runs = t.runs.c
    pending = (
        sa.select(t.runs)
        .where(runs.status == RunStatus.PENDING.value, runs.paused.is_(False))
        .order_by(runs.priority.desc(), runs.created_at, runs.id)
        .limit(sa.bindparam("limit", type_=sa.Integer()))
    )
    c = tx.dialect.lock(pending, skip_locked=True).cte("c")
    stages = t.stages
    timed = (
        sa.exists().where(t.timers.c.run_id == c.c.id, t.timers.c.fired_at.is_(None)).label("timed")
    )
    return (
        sa.select(
            *(c.c[col.name].label(f"r_{col.name}") for col in t.runs.c),
            *(stages.c[col.name].label(f"s_{col.name}") for col in stages.c),
            timed,
        )
        .select_from(c.outerjoin(stages, stages.c.run_id == c.c.id))
        .order_by(
            c.c.priority.desc(),
            c.c.created_at,
            c.c.id,
            stages.c.execution_group,
            stages.c.ordinal,
        )
    )


async def claim_candidates(
    tx: SqlTransactionUnit, limit: int
) -> tuple[list[Run], dict[str, list[StageRun]], set[str]] | None:
    """``ClaimReadStore.claim_candidates`` on a ``SqlTransaction`` (see the module
    docstring); ``None`` on SQLite (which locks the whole database for a writer anyway:
    the kernel claims under its lock)."""
    tx._check()
    if not tx.dialect.set_statements:
        return None
    query = tx.prepared("claim_candidates", _candidates_sql)
    driver = await _alone(tx)
    try:
        rows = list(await tx.execute(query, "claim candidates", {"limit": limit}))
    finally:
        if driver is not None:
            await _transactional_again(tx, driver)
    runs: list[Run] = []
    stages: dict[str, list[StageRun]] = {}
    timed: set[str] = set()
    for row in rows:
        data = row._mapping
        run_id = data["r_id"]
        if run_id not in stages:
            run_data = {key[2:]: value for key, value in data.items() if key.startswith("r_")}
            runs.append(await tx.run_from_columns(run_data))
            stages[run_id] = []
            if data["timed"]:
                timed.add(run_id)
        if data["s_run_id"] is not None:
            stage_data = {key[2:]: value for key, value in data.items() if key.startswith("s_")}
            stages[run_id].append(await tx.stage_from_columns(stage_data))
    return runs, stages, timed
