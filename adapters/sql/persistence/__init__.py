"""SQL Persistence on SQLAlchemy 2 Core (asyncio): PostgreSQL and SQLite.

``connection.py`` holds the unit of work (``SqlTransaction``: one database transaction
on one connection, its plumbing: ``execute``, payload offload, NOTIFY, the statement
cache) and ``SqlPersistence``; each concern of the ``Transaction`` port is a module of
its own (``runs``, ``stages``, ``outbox``, ``idempotency``, ``annotations``, ``logs``,
``journal``, ``inbox``, ``timers``) whose store the transaction exposes as an attribute
(``tx.runs``), all on that one connection. ``shared.py`` has the row conversions more
than one concern uses.
"""

from typing import TYPE_CHECKING

from treadle.adapters.sql.persistence.connection import SqlPersistence, SqlTransaction

__all__ = ["SqlPersistence", "SqlTransaction"]

if TYPE_CHECKING:  # mypy proves the transaction (and each of its stores) fits the port
    from treadle.ports.persistence import Transaction

    def _conforms(tx: SqlTransaction) -> Transaction:
        return tx
