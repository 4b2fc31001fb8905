"""Column types that make both dialects hand back the same Python values.

The kernel compares timestamps and sorts by them, so every datetime must come
back timezone-aware in UTC: PostgreSQL stores ``timestamptz`` natively, SQLite
stores fixed-width UTC text (which also sorts correctly as text). JSON is JSONB
on PostgreSQL (indexable, compact) and JSON text on SQLite. Identifier columns
use the byte-order ``C`` collation on PostgreSQL so ``ORDER BY id`` agrees with
Python's ``sorted`` whatever the database's locale is.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeEngine


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """A timezone-aware datetime, stored and returned in UTC on every dialect.

    Naive datetimes are taken to be UTC already (the kernel's clock is UTC).
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        if dialect.name == "sqlite":
            # SQLite's DATETIME drops the offset; store UTC wall time so text order is time order.
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
        if moment.tzinfo is UTC:  # PostgreSQL sessions run in UTC (engine.SESSION_OPTIONS)
            return moment
        if moment.tzinfo is None:
            return moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)


class Duration(sa.types.TypeDecorator[timedelta]):
    """A ``timedelta`` stored exactly, as whole microseconds in a BIGINT."""

    impl = sa.BigInteger
    cache_ok = True

    def process_bind_param(self, value: timedelta | None, dialect: Dialect) -> int | None:
        return duration_micros(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> timedelta | None:
        if value is None:
            return None
        return timedelta(microseconds=int(value))


def duration_micros(value: timedelta | None) -> int | None:
    """What a ``Duration`` column stores for ``value``: whole microseconds, exactly."""
    if value is None:
        return None
    return (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds


def utc_iso(value: datetime | None) -> str | None:
    """ISO-8601 text with an offset for the moment a ``UtcDateTime`` column stores for
    ``value`` (naive means UTC), for writes that pass timestamps inside JSON."""
    if value is None:
        return None
    zone = value.tzinfo
    if zone is UTC:  # the kernel's clock: no conversion
        return value.isoformat()
    return (value.replace(tzinfo=UTC) if zone is None else value.astimezone(UTC)).isoformat()


def json_type() -> TypeEngine[Any]:
    """JSONB on PostgreSQL, JSON text on SQLite."""
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def key_type() -> TypeEngine[str]:
    """Identifiers and keys: unbounded text, byte-ordered on PostgreSQL."""
    return sa.String().with_variant(postgresql.VARCHAR(collation="C"), "postgresql")


def big_id_type() -> TypeEngine[int]:
    """An auto-incrementing surrogate key: BIGINT on PostgreSQL, INTEGER (rowid) on SQLite."""
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")
