"""Alembic environment: runs Treadle's revisions on the connection ``migrate`` passes in.

``migrate()`` hands over an open connection in ``config.attributes``; when Alembic
is driven from its own command line instead, a connection is made from the
``sqlalchemy.url`` option. SQLite gets batch mode so later revisions can alter
tables (SQLite's ALTER TABLE is limited).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from treadle.adapters.sql.schema import VERSION_TABLE, metadata


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set sqlalchemy.url or pass a connection to run migrations")
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


def run_migrations_offline() -> None:
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
