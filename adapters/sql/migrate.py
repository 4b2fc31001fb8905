"""Schema migrations, run from code: ``migrate(url)`` brings a database to head.

The Alembic scripts ship inside the package (``migrations/``), so no
``alembic.ini`` is needed: the configuration is built here with the script
location pointing at the installed package. One history serves PostgreSQL and
SQLite. ``migrate(url)`` uses a blocking driver (the CLI's ``treadle migrate``);
``migrate_engine(engine)`` runs the same upgrade through an existing
``AsyncEngine`` (``SqlPersistence.open(url, migrate=True)``, ``Engine.open``).
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from treadle.adapters.sql.engine import sync_url
from treadle.adapters.sql.schema import VERSION_TABLE

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str | URL | None = None) -> Config:
    """An Alembic ``Config`` for Treadle's migrations (for ``command.*`` calls)."""
    config = Config()
    # ConfigParser interpolates '%': escape it in paths and passwords.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if url is not None:
        rendered = sync_url(url).render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


def _engine(url: str | URL) -> sa.Engine:
    return sa.create_engine(sync_url(url), poolclass=sa.pool.NullPool)


def migrate(url: str | URL, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` (default: the latest). Idempotent."""
    engine = _engine(url)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "sqlite":
                # Persistent per file: set once so every later connection is in WAL.
                connection.exec_driver_sql("PRAGMA journal_mode = WAL")
            config = alembic_config(url)
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


async def migrate_engine(engine: AsyncEngine, revision: str = "head") -> None:
    """Upgrade the database behind ``engine`` in one transaction on one of its connections."""
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade_on, revision)


def _upgrade_on(connection: sa.Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


def current_revision(url: str | URL) -> str | None:
    """The revision the database is at; ``None`` for an empty (unmigrated) database."""
    engine = _engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            return context.get_current_revision()
    finally:
        engine.dispose()


def head_revision() -> str:
    """The latest revision this version of Treadle ships."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package always ships a revision
        raise RuntimeError("no Alembic revisions found in the treadle package")
    return head
