"""``tx.append_journal`` on PostgreSQL: a code workflow step's commit in ONE statement.

Each step result an activation records (``kernel/workflows/executor.py``, ``_Writer``)
took a transaction of five round trips: BEGIN, the ownership read (run locked, stage,
job: ``SqlJobTransport.get_owned``), the journal insert, the events, COMMIT. The
activation knows what it owns (``JournalOwner``, from its first phase), so here the
ownership check is a locking CTE of the write itself, and the statement is sent without
BEGIN/COMMIT (``write_set._alone``: one statement is atomic by itself)::

    WITH o AS (SELECT r.id FROM runs r JOIN stages s ON <stage at its version>
               JOIN jobs j ON <job leased to this worker at this attempt>
               WHERE r.id = :run_id AND r.version = :run_version FOR UPDATE OF r),
         w_l AS (INSERT INTO journal ... WHERE <gate> ON CONFLICT DO NOTHING
                 RETURNING id, position),
         e_v, e_n, e_s AS (INSERT INTO run_event_seq ... WHERE <gate> ...), e_q,
         w_e AS (INSERT INTO outbox ... RETURNING run_id, sequence)
    SELECT <rows per CTE>, <ids of the entries>, CASE WHEN <all as expected> THEN 0
           ELSE CAST('treadle journal guard: ...' AS INTEGER) END, <event feed NOTIFY>

``<gate>`` is ``(SELECT count(*) FROM o) = 1``. ``FOR UPDATE OF r`` takes the run's row
lock, as the reading commit's ``get_owned`` does, so the commit serialises with
``run.signal``, ``run.cancel`` and every other writer of the run; under READ COMMITTED a
run updated meanwhile is re-checked at its newest version, so a cancel that committed
first fails the guard. A failed guard (or an entry already recorded) makes the final
column's CAST fail, which aborts the statement: NOTHING is written, and the caller
commits through the reads instead (``ConcurrencyError``/``DuplicateError``).

Not taken here (``None``; the caller reads): SQLite, a job transport other than this
persistence's, and values or events that go to the blob store.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from treadle.adapters.sql.errors import translate
from treadle.adapters.sql.persistence.journal import (
    _PG_JOURNAL_ROWS,
    pg_insert_journal_sql,
    pg_journal_rows,
)
from treadle.adapters.sql.persistence.outbox import (
    _PG_OUTBOX_ROWS,
    FEED_NOTIFY,
    inline_event_rows,
    pg_append_events_ctes,
)
from treadle.adapters.sql.persistence.write_set import (
    SqlTransactionUnit,
    _alone,
    _transactional_again,
)
from treadle.kernel.errors import ConcurrencyError, DuplicateError
from treadle.kernel.model import JobStatus, evolve

if TYPE_CHECKING:
    from treadle.kernel.events import EventBase
    from treadle.kernel.workflows.model import JournalEntry, JournalOwner
    from treadle.ports.job_transport import JobTransport

__all__ = ["JOURNAL_GUARD_MARK", "append_journal"]

JOURNAL_GUARD_MARK = "treadle journal guard"
"""The text of the error the statement raises when a guard fails."""

_GUARD_RE = re.compile(JOURNAL_GUARD_MARK + r": o=(\d+) l=(\d+)/(\d+) e=(\d+)/(\d+)")

_GATE = "(SELECT count(*) FROM o) = 1"

_OWNER = (
    "o AS (SELECT r.id FROM runs AS r "
    "JOIN stages AS s ON s.run_id = r.id AND s.stage_id = :stage_id "
    "AND s.version = :stage_version "
    "JOIN jobs AS j ON j.id = :job_id AND j.status = :leased AND j.worker_id = :worker_id "
    "AND j.attempts = :job_attempts "
    "WHERE r.id = :run_id AND r.version = :run_version FOR UPDATE OF r)"
)


def _shape_sql(events: bool, feed: bool) -> str:
    ctes = [_OWNER, f"w_l AS ({pg_insert_journal_sql('l_rows', _GATE)})"]
    counts = {"o": "(SELECT count(*) FROM o)", "l": "(SELECT count(*) FROM w_l)", "e": "0"}
    if events:
        event_ctes, insert = pg_append_events_ctes(rows="e_rows", prefix="e_", where=_GATE)
        ctes.extend(event_ctes)
        ctes.append(f"w_e AS ({insert})")
        counts["e"] = "(SELECT count(*) FROM w_e)"
    ok = f"{counts['o']} = 1 AND {counts['l']} = :l_n AND {counts['e']} = :e_n"
    report = (
        f"' o=' || {counts['o']} || ' l=' || {counts['l']} || '/' || :l_n"
        f" || ' e=' || {counts['e']} || '/' || :e_n"
    )
    columns = [
        "(SELECT json_agg(json_build_array(w_l.position, w_l.id)) FROM w_l) AS ids",
        f"CASE WHEN {ok} THEN 0 ELSE CAST('{JOURNAL_GUARD_MARK}:' || {report} AS INTEGER) END"
        " AS ok",
    ]
    if events and feed:
        columns.append(f"{FEED_NOTIFY} AS feed")
    return f"WITH {', '.join(ctes)} SELECT {', '.join(columns)}"


def _statement(tx: SqlTransactionUnit, events: bool, feed: bool) -> sa.TextClause:
    name = f"append_journal:{int(events)}{int(feed)}"

    def build() -> sa.TextClause:
        params: list[sa.BindParameter[Any]] = [
            sa.bindparam("l_rows", type_=sa.Text()),
            sa.bindparam("l_n", type_=sa.Integer()),
            sa.bindparam("e_n", type_=sa.Integer()),
            sa.bindparam("stage_version", type_=sa.Integer()),
            sa.bindparam("job_attempts", type_=sa.Integer()),
            sa.bindparam("run_version", type_=sa.Integer()),
        ]
        if events:
            params.append(sa.bindparam("e_rows", type_=sa.Text()))
        return sa.text(_shape_sql(events, feed)).bindparams(*params)

    statement: sa.TextClause = tx.dialect.cached(name, build)
    return statement


async def append_journal(
    tx: SqlTransactionUnit,
    transport: JobTransport,
    owner: JournalOwner,
    entries: Sequence[JournalEntry],
    events: Sequence[EventBase],
) -> list[JournalEntry] | None:
    """``JournalAppendStore.append_journal`` on a ``SqlTransaction`` (module docstring)."""
    tx._check()
    persistence = getattr(transport, "persistence", None)
    if (
        not tx.dialect.set_statements
        or not entries
        or any(entry.id is not None for entry in entries)
        or getattr(persistence, "dialect", None) is not tx.dialect
    ):
        return None
    offloads = tx.payloads.offloads if tx.payloads is not None else None
    rows = pg_journal_rows(list(entries), offloads)
    if rows is None:
        return None
    found_rows = inline_event_rows(tx, events)
    if found_rows is None:
        return None
    event_rows = found_rows
    params: dict[str, Any] = _PG_JOURNAL_ROWS.encode(rows, "l_rows")
    params["l_n"] = len(rows)
    params["e_n"] = len(event_rows)
    if event_rows:
        params |= _PG_OUTBOX_ROWS.encode(event_rows, "e_rows")
    params |= {
        "run_id": owner.run_id,
        "run_version": owner.run_version,
        "stage_id": owner.stage_id,
        "stage_version": owner.stage_version,
        "job_id": owner.job_id,
        "leased": JobStatus.LEASED.value,
        "worker_id": owner.worker_id,
        "job_attempts": owner.job_attempts,
    }
    feed = tx.notify_events
    statement = _statement(tx, bool(event_rows), feed)
    # The whole transaction: sent without BEGIN/COMMIT when nothing was sent before it.
    driver = await _alone(tx) if tx.due is None and not tx.created_blobs else None
    try:
        row = (await tx.connection.execute(statement, params)).first()
    except sa_exc.DBAPIError as exc:
        raise _guard_error(exc) from exc
    finally:
        if driver is not None:
            await _transactional_again(tx, driver)
    if driver is not None:
        tx.active = False  # committed: a further statement could not join it
    if event_rows:
        tx.appended_events = True
    assert row is not None
    ids = {int(position): int(id_) for position, id_ in row.ids or []}
    return [evolve(entry, {"id": ids[entry.position], "version": 0}) for entry in entries]


def _guard_error(exc: sa_exc.DBAPIError) -> Exception:
    """The error of a failed statement: what the reading commit would meet."""
    found = _GUARD_RE.search(str(exc.orig))
    if found is None:
        return translate(exc, "append journal")
    o, lines, lines_n, _, _ = (int(x) for x in found.groups())
    if o != 1:
        return ConcurrencyError(
            "the run, its stage or its job moved on since the activation started (nothing written)"
        )
    if lines != lines_n:
        return DuplicateError("a journal entry with this name, occurrence or position exists")
    return ConcurrencyError(f"the journal's events were not all appended: {exc.orig}")
