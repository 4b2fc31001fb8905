"""Driver errors become ``TreadleError``s here, at the adapter boundary.

Callers above the ports only ever see the kernel's error tree: a unique-key
violation is a ``DuplicateError`` on both dialects, anything that retrying may
cure (lost connection, serialization failure, deadlock, ``database is locked``)
is a ``TransientStorageError``, and the rest is a ``StorageError``. The driver's
exception stays attached as ``__cause__`` for debugging.
"""

from __future__ import annotations

import sqlite3

from sqlalchemy import exc as sa_exc

from treadle.kernel.errors import DuplicateError, StorageError, TransientStorageError

_UNIQUE_SQLSTATE = "23505"
_TRANSIENT_SQLSTATE_PREFIXES = ("08", "40", "53", "57P")
"""Connection exceptions, transaction rollbacks (serialization, deadlock), insufficient
resources, operator intervention (admin shutdown, ``pg_terminate_backend``)."""


def _sqlstate(orig: BaseException | None) -> str | None:
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return state if isinstance(state, str) else None


def is_unique_violation(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", exc)
    if _sqlstate(orig) == _UNIQUE_SQLSTATE:
        return True
    if isinstance(orig, sqlite3.IntegrityError):
        name = getattr(orig, "sqlite_errorname", "")
        text = str(orig)
        return name in ("SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY") or (
            "UNIQUE constraint failed" in text
        )
    return False


def translate(exc: BaseException, what: str = "storage operation") -> StorageError | DuplicateError:
    """The ``TreadleError`` to raise (``from exc``) for a driver/SQLAlchemy error."""
    detail = f"{what} failed: {type(exc).__name__}: {exc}".splitlines()[0]
    if isinstance(exc, sa_exc.IntegrityError) and is_unique_violation(exc):
        return DuplicateError(f"{what}: a row with the same unique key already exists")
    if isinstance(exc, sa_exc.DBAPIError):
        state = _sqlstate(exc.orig)
        if exc.connection_invalidated or (
            state is not None and state.startswith(_TRANSIENT_SQLSTATE_PREFIXES)
        ):
            return TransientStorageError(detail)
        if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
            return TransientStorageError(detail)
        return StorageError(detail)
    if isinstance(exc, sa_exc.DisconnectionError | sa_exc.TimeoutError):
        return TransientStorageError(detail)
    if isinstance(exc, ConnectionError | TimeoutError | OSError):
        return TransientStorageError(detail)
    return StorageError(detail)
