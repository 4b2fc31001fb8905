"""Row conversions and helpers that several concern modules of the SQL adapter share
(runs and stages are read by the job transport's joined reads too, through
``SqlTransaction.run_from_columns`` / ``stage_from_columns``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from enum import Enum
from typing import Any, Protocol

import sqlalchemy as sa

from treadle.adapters.due_times import DueKind
from treadle.adapters.sql.dialect import Build, SqlDialect
from treadle.adapters.sql.payloads import PayloadOffload
from treadle.kernel.model import (
    Run,
    StageRun,
    StageStatus,
    construct,
)

_RUN_PAYLOADS = ("input", "output")


_STAGE_PAYLOADS = ("output", "suspended_state", "resume_state")


def _plain(value: Any) -> Any:
    # Enums go in as their values: drivers differ on how they adapt Enum subclasses.
    return value.value if isinstance(value, Enum) else value


def _run_from_row(row: sa.Row[Any]) -> Run:
    return Run.model_validate(dict(row._mapping))


def _stage_from_columns(data: dict[str, Any]) -> StageRun:
    """A ``StageRun`` from a ``stages`` row's columns (``data`` is consumed).

    Built with ``construct``, not validated: every column already comes back as its
    field's type (the column types see to it: integers, UTC datetimes, ``Duration``,
    JSON), except the status text, converted here, which rejects an unknown value. The
    schema is the validation; pydantic's would cost more than the rest of reading the
    row, about four times per stage committed."""
    data["workflow_run_id"] = data.pop("run_id")
    data.pop("ordinal", None)
    data["status"] = StageStatus(data["status"])
    return construct(StageRun, data)


def _stage_from_row(row: sa.Row[Any]) -> StageRun:
    return _stage_from_columns(dict(row._mapping))


def _reject_duplicates(keys: Sequence[Any], what: str) -> None:
    """``ValueError`` if a key occurs twice in one set-oriented update: its second
    update would always be stale, a caller's bug rather than a concurrent writer."""
    seen: set[Any] = set()
    for key in keys:
        if key in seen:
            raise ValueError(f"{what} {key!r} occurs more than once in one call")
        seen.add(key)


def _not_written(
    items: Sequence[tuple[str, Any, Mapping[str, Any]]],
) -> list[str]:
    """After an executemany of optimistic updates updated fewer rows than it had: the
    names of the items it did not write. Each item is (name, the stored row or None,
    the parameters written). A version alone cannot tell: a concurrent writer that won
    moved the row to the very version this call would have written. So a row counts as
    written by the call iff it holds every value the call set (a concurrent writer
    storing exactly the same values is indistinguishable, and harmless to leave out).
    If nothing can be told apart, every item is named."""
    stale = [
        name
        for name, stored, values in items
        if stored is None
        or any(
            not key.startswith("w_") and key in stored and stored[key] != value
            for key, value in values.items()
        )
    ]
    return stale or [name for name, _, _ in items]


class SqlUnit(Protocol):
    """What the concern stores use of the ``SqlTransaction`` they belong to: stated
    here, so the concern modules import nothing of ``connection``, which imports them."""

    active: bool
    ended_runs: list[str] | None
    appended_events: bool
    notify_events: bool
    final_runs: dict[str, Run] | None
    payloads: PayloadOffload | None
    dialect: SqlDialect
    _fresh: dict[str, set[str]]
    _notified: set[str]

    def _check(self) -> None: ...

    async def execute(
        self, statement: sa.Executable, what: str = "query", parameters: Any = None
    ) -> sa.CursorResult[*tuple[Any, ...]]: ...

    def note_due(self, kind: DueKind, when: datetime) -> None: ...

    def prepared(self, name: str, build: Build) -> Any: ...

    async def _put_payload(self, scope: str | None, value: Any) -> Any: ...

    async def _get_payload(self, value: Any, run_id: str | None) -> Any: ...

    async def run_from_columns(self, data: dict[str, Any]) -> Run: ...

    async def stage_from_columns(self, data: dict[str, Any]) -> StageRun: ...
