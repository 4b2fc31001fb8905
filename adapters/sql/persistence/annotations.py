"""Annotations in the SQL adapter: the ``Annotations`` concern of one
``SqlTransaction``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

import treadle.adapters.sql.schema as t
from treadle.adapters.sql.persistence.shared import SqlUnit
from treadle.kernel.errors import (
    DuplicateError,
)
from treadle.kernel.model import (
    Annotation,
)


def _annotation_from_row(row: sa.Row[Any]) -> Annotation:
    return Annotation(
        id=row.id,
        workflow_run_id=row.run_id,
        attributes=row.attributes,
        actor=row.actor,
        scope=row.scope,
        stage_id=row.stage_id,
        idempotency_key=row.idempotency_key,
        created_at=row.created_at,
    )


class SqlAnnotations:
    """Annotations on this transaction's connection (``tx.annotations``)."""

    __slots__ = ("_tx",)

    def __init__(self, tx: SqlUnit) -> None:
        self._tx = tx

    async def insert_many(self, annotations: Sequence[Annotation]) -> None:
        self._tx._check()
        if not annotations:
            return
        keyed = [(a.workflow_run_id, a.idempotency_key) for a in annotations if a.idempotency_key]
        taken: set[tuple[str, str]] = set()
        if keyed:
            c = t.annotations.c
            query = sa.select(c.run_id, c.idempotency_key).where(
                c.run_id.in_({r for r, _ in keyed}),
                c.idempotency_key.in_({k for _, k in keyed}),
            )
            taken = {(row.run_id, row.idempotency_key) for row in await self._tx.execute(query)}
        rows: list[dict[str, Any]] = []
        for annotation in annotations:
            if annotation.idempotency_key is not None:
                key = (annotation.workflow_run_id, annotation.idempotency_key)
                if key in taken:
                    raise DuplicateError(
                        f"annotation key {annotation.idempotency_key!r} already used on run "
                        f"{annotation.workflow_run_id!r}"
                    )
                taken.add(key)
            rows.append(
                {
                    "id": annotation.id,
                    "run_id": annotation.workflow_run_id,
                    "attributes": annotation.attributes,
                    "actor": annotation.actor,
                    "scope": annotation.scope,
                    "stage_id": annotation.stage_id,
                    "idempotency_key": annotation.idempotency_key,
                    "created_at": annotation.created_at,
                }
            )
        await self._tx.execute(sa.insert(t.annotations).values(rows), "insert annotations")

    async def find(self, run_id: str, idempotency_key: str) -> Annotation | None:
        c = t.annotations.c
        query = sa.select(t.annotations).where(
            c.run_id == run_id, c.idempotency_key == idempotency_key
        )
        row = (await self._tx.execute(query, "find annotation")).first()
        return _annotation_from_row(row) if row is not None else None

    async def for_run(
        self,
        run_id: str,
        *,
        key: str | None = None,
        key_prefix: str | None = None,
        scope: str | None = None,
        limit: int = 100,
    ) -> list[Annotation]:
        c = t.annotations.c
        query = sa.select(t.annotations).where(c.run_id == run_id).order_by(c.seq)
        if scope is not None:
            query = query.where(c.scope == scope)
        if key is None and key_prefix is None:
            query = query.limit(limit)
        out: list[Annotation] = []
        # Key filters run here, not in SQL: exact, case-sensitive prefix semantics on both
        # dialects (SQLite's LIKE ignores case), over one run's (few) annotations.
        for row in await self._tx.execute(query, "list annotations"):
            attributes: Mapping[str, Any] = row.attributes
            if key is not None and key not in attributes:
                continue
            if key_prefix is not None and not any(k.startswith(key_prefix) for k in attributes):
                continue
            out.append(_annotation_from_row(row))
            if len(out) >= limit:
                break
        return out
