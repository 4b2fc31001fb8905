"""The differences between PostgreSQL and SQLite, as small named hooks on one object.

Everything else in the SQL adapter is written once against SQLAlchemy Core; where the
two databases differ (the INSERT construct with ``ON CONFLICT``, array parameters, row
locks, JSON equality, the GIN containment filter, NOTIFY, set-oriented writes), the code
asks ``tx.dialect`` instead of testing the dialect's name. Each ``SqlPersistence`` owns
one dialect object, which also holds its prebuilt statements (``prepared``): no
module-global cache.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

import treadle.adapters.sql.pg_bulk as pg_bulk
from treadle.adapters.sql.engine import NOTIFY_CHANNEL, configure_sqlite
from treadle.adapters.sql.sqlite_driver import DRIVER as SQLITE_DRIVER
from treadle.adapters.sql.sqlite_driver import READ_ONLY_OPTION


class Executes(Protocol):
    """What the hooks use of a ``SqlTransaction`` (a protocol: this module stays below
    ``persistence``, which imports it)."""

    async def execute(
        self, statement: sa.Executable, what: str = "query", parameters: Any = None
    ) -> sa.CursorResult[*tuple[Any, ...]]: ...


Build = Callable[[Any], Any]
"""A statement builder: given the transaction (only its ``dialect`` may matter)."""


@dataclass(frozen=True, slots=True)
class SetWrite:
    """One set-oriented write of rows (``update_many``, ``put_many``): on PostgreSQL one
    statement of one JSON parameter (``pg_bulk``), the rows sorted by ``order`` so two
    transactions writing overlapping rows lock them alike; on SQLite the prebuilt
    ``sqlite`` statement (built by ``sqlite_build`` when given), executed many."""

    name: str
    pg_statement: sa.TextClause
    pg_rows: pg_bulk.RecordSet
    order: Callable[[Mapping[str, Any]], Any] | None = None
    numbered: bool = False
    """PostgreSQL: number the rows (field ``i``, in the order sent) for the statement's
    ``ORDER BY``, which fixes the order it inserts (and locks) them in."""
    sqlite: Any = None
    sqlite_build: Build | None = None


class SqlDialect:
    """The hooks; ``PostgresDialect`` and ``SqliteDialect`` implement them."""

    name: str = ""
    is_postgres: bool = False
    set_statements: bool = False
    """Whether one statement of one JSON parameter can insert, number and return a set
    of rows (``pg_bulk``): the adapter then takes its one-statement paths (events
    numbered on the server, stages with their ordinals) instead of several statements."""
    payload_notify: sa.TextClause | None = None
    """``pg_notify(channel, :payload)`` where the database delivers notifications (run
    ends, due times); ``None`` where workers poll."""
    single_writer: bool = False
    """Whether the database admits one writer at a time (SQLite): this process's write
    transactions then queue on an asyncio lock instead of in the busy handler."""
    read_only_options: Mapping[str, Any] = {}
    """Connection execution options of a read-only transaction (SQLite: skip the write
    lock, ``sqlite_driver.READ_ONLY_OPTION``)."""
    inline: bool = False
    """Whether statements inside a transaction never wait (SQLite's inline driver,
    ``sqlite_driver.py``): ``SqlTransaction.execute`` then runs them on the sync
    connection, without SQLAlchemy's greenlet hand-over per statement."""

    def configure(self, engine: AsyncEngine) -> None:
        """Per-engine setup when a persistence is built on ``engine`` (SQLite pragmas)."""

    def __init__(self) -> None:
        self._prepared: dict[str, Any] = {}

    def cached(self, name: str, build: Callable[[], Any]) -> Any:
        """The statement ``build()`` makes, built once per persistence and reused."""
        statement = self._prepared.get(name)
        if statement is None:
            statement = self._prepared[name] = build()
        return statement

    def prepared(self, tx: Any, name: str, build: Build) -> Any:
        """The statement ``build(tx)`` makes, built once per persistence and reused.

        A statement object built per call costs SQLAlchemy a cache-key walk (about
        100 us for a wide table) before its compiled form is found; the hot-path
        statements are therefore built once with ``bindparam``s and executed with
        parameters. ``build`` must depend on nothing but the dialect."""
        statement = self._prepared.get(name)
        if statement is None:
            statement = self._prepared[name] = build(tx)
        return statement

    def insert(self, table: sa.Table) -> Any:
        """The dialect's INSERT construct (it has ``on_conflict_do_*``)."""
        raise NotImplementedError

    def any_of(self, column: sa.ColumnElement[Any], name: str) -> sa.ColumnElement[bool]:
        """``column`` is one of the list bound as ``name``."""
        raise NotImplementedError

    def lock(
        self, query: sa.Select[Any], *, skip_locked: bool = False, of: sa.Table | None = None
    ) -> sa.Select[Any]:
        """``query`` locking the rows it reads (of ``of`` only, if given) until commit,
        where the database can; ``skip_locked``: passing over rows others hold."""
        raise NotImplementedError

    def json_equals(self, column: sa.ColumnElement[Any], key: str, value: Any) -> Any:
        """``column[key] == value`` for a JSON object column, with the key required."""
        raise NotImplementedError

    def attributes_match(
        self, column: sa.ColumnElement[Any], attributes: Mapping[str, Any]
    ) -> list[Any]:
        """Every ``column[key] == value`` of ``attributes`` (search attributes)."""
        return [self.json_equals(column, k, v) for k, v in attributes.items()]

    def notify_statement(self, payload: str) -> sa.TextClause | None:
        """``NOTIFY`` of ``payload`` (``run``, ``jobs``), or ``None`` where there is none."""
        return None

    async def write_many(
        self,
        tx: Executes,
        write: SetWrite,
        rows: list[dict[str, Any]],
        what: str,
        **extra: Any,
    ) -> sa.CursorResult[*tuple[Any, ...]]:
        """Write ``rows`` with ``write`` in one round trip; ``extra``: further named
        parameters of the PostgreSQL statement (``keys`` to lock first)."""
        raise NotImplementedError


class PostgresDialect(SqlDialect):
    """PostgreSQL: row locks, arrays, JSONB, NOTIFY, set statements of one parameter."""

    name = "postgresql"
    is_postgres = True
    set_statements = True
    payload_notify = sa.text(f"SELECT pg_notify('{NOTIFY_CHANNEL}', :payload)")

    _NOTIFY = {kind: sa.text(f"NOTIFY {NOTIFY_CHANNEL}, '{kind}'") for kind in ("run", "jobs")}

    def insert(self, table: sa.Table) -> Any:
        return postgresql.insert(table)

    def any_of(self, column: sa.ColumnElement[Any], name: str) -> sa.ColumnElement[bool]:
        # One array parameter (``= ANY(:name)``): the statement's text is the same for
        # every length, so psycopg converts it once and the server keeps one prepared
        # statement, where an expanding ``IN`` list makes a new statement of every length.
        array = postgresql.ARRAY(column.type)
        return column == sa.any_(sa.bindparam(name, type_=array))

    def lock(
        self, query: sa.Select[Any], *, skip_locked: bool = False, of: sa.Table | None = None
    ) -> sa.Select[Any]:
        return query.with_for_update(skip_locked=skip_locked, of=of)

    def json_equals(self, column: sa.ColumnElement[Any], key: str, value: Any) -> Any:
        return column.op("->")(sa.literal(key, sa.String())) == sa.cast(
            sa.literal(json.dumps(value), sa.String()), postgresql.JSONB()
        )

    def attributes_match(
        self, column: sa.ColumnElement[Any], attributes: Mapping[str, Any]
    ) -> list[Any]:
        """One containment test (``search_attributes @> '{...}'``) that the GIN index
        ``ix_runs_search_attributes`` serves; containment equals equality for scalars, and
        is implied by it for objects and arrays, which therefore also get an exact
        comparison."""
        if not attributes:
            return []
        contains = column.op("@>")(
            sa.cast(sa.literal(json.dumps(dict(attributes)), sa.String()), postgresql.JSONB())
        )
        exact = [
            self.json_equals(column, k, v)
            for k, v in attributes.items()
            if isinstance(v, dict | list | tuple)
        ]
        return [contains, *exact]

    def notify_statement(self, payload: str) -> sa.TextClause | None:
        return self._NOTIFY[payload]

    async def write_many(
        self,
        tx: Executes,
        write: SetWrite,
        rows: list[dict[str, Any]],
        what: str,
        **extra: Any,
    ) -> sa.CursorResult[*tuple[Any, ...]]:
        if write.order is not None:
            rows = sorted(rows, key=write.order)
        if write.numbered:
            for i, row in enumerate(rows):
                row["i"] = i
        params: dict[str, Any] = write.pg_rows.encode(rows)
        params.update(extra)
        return await tx.execute(write.pg_statement, what, params)


class SqliteDialect(SqlDialect):
    """SQLite: one writer (BEGIN IMMEDIATE) instead of row locks, JSON1, no NOTIFY,
    executemany for set writes."""

    name = "sqlite"
    single_writer = True
    read_only_options: Mapping[str, Any] = {READ_ONLY_OPTION: True}

    def configure(self, engine: AsyncEngine) -> None:
        configure_sqlite(engine)
        self.inline = engine.dialect.driver == SQLITE_DRIVER

    def insert(self, table: sa.Table) -> Any:
        return sqlite.insert(table)

    def any_of(self, column: sa.ColumnElement[Any], name: str) -> sa.ColumnElement[bool]:
        return column.in_(sa.bindparam(name, expanding=True))  # no arrays: expanding IN

    def lock(
        self, query: sa.Select[Any], *, skip_locked: bool = False, of: sa.Table | None = None
    ) -> sa.Select[Any]:
        return query  # BEGIN IMMEDIATE already holds the database write lock

    def json_equals(self, column: sa.ColumnElement[Any], key: str, value: Any) -> Any:
        return sqlite_json_equals(column, '$."' + key.replace('"', '\\"') + '"', value)

    async def write_many(
        self,
        tx: Executes,
        write: SetWrite,
        rows: list[dict[str, Any]],
        what: str,
        **extra: Any,
    ) -> sa.CursorResult[*tuple[Any, ...]]:
        # One executemany: SQLAlchemy sums the rowcount (supports_sane_multi_rowcount).
        statement = write.sqlite
        if write.sqlite_build is not None:
            statement = self.prepared(tx, write.name, write.sqlite_build)
        return await tx.execute(statement, what, rows[0] if len(rows) == 1 else rows)


def dialect_for(name: str) -> SqlDialect:
    """A fresh dialect object for SQLAlchemy's dialect ``name``."""
    if name == "postgresql":
        return PostgresDialect()
    if name == "sqlite":
        return SqliteDialect()
    raise ValueError(f"unsupported SQL dialect {name!r}")


def sqlite_json_equals(column: sa.ColumnElement[Any], path: str, value: Any) -> Any:
    """``column`` at JSON ``path`` equals ``value`` with JSONB's semantics on SQLite: types
    must agree (``json_extract`` alone makes ``true`` equal ``1``) and objects compare by
    content, not by the key order of their text."""
    kind = sa.func.json_type(column, path)
    if value is None:
        return kind == "null"
    if isinstance(value, bool):
        return kind == ("true" if value else "false")
    if isinstance(value, int | float):
        return sa.and_(kind.in_(("integer", "real")), sa.func.json_extract(column, path) == value)
    if isinstance(value, str):
        return sa.and_(kind == "text", sa.func.json_extract(column, path) == value)
    if isinstance(value, list | tuple):
        items = [sqlite_json_equals(column, f"{path}[{i}]", v) for i, v in enumerate(value)]
        return sa.and_(
            kind == "array", sa.func.json_array_length(column, path) == len(value), *items
        )
    if isinstance(value, dict):
        members = sa.func.json_each(column, path).table_valued("key")
        count = sa.select(sa.func.count()).select_from(members).scalar_subquery()
        fields = [
            sqlite_json_equals(column, path + '."' + k.replace('"', '\\"') + '"', v)
            for k, v in value.items()
        ]
        return sa.and_(kind == "object", count == len(value), *fields)
    raise TypeError(f"cannot filter on a {type(value).__name__} attribute value")


__all__ = [
    "PostgresDialect",
    "SetWrite",
    "SqlDialect",
    "SqliteDialect",
    "dialect_for",
    "sqlite_json_equals",
]
