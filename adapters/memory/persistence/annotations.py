"""Annotations in the in-memory adapter: the ``Annotations`` concern of one
``InMemoryTransaction``."""

from __future__ import annotations

import functools
from collections.abc import Sequence

from treadle.adapters.memory.persistence.shared import MemoryUnit, _drop_last
from treadle.kernel.errors import DuplicateError
from treadle.kernel.model import (
    Annotation,
)


class MemoryAnnotations:
    """Annotations on this transaction's store (``tx.annotations``)."""

    __slots__ = ("_s", "_tx", "_undo")

    def __init__(self, tx: MemoryUnit) -> None:
        self._tx = tx
        self._s = tx._s
        self._undo = tx._undo

    async def insert_many(self, annotations: Sequence[Annotation]) -> None:
        self._tx._check()
        for annotation in annotations:
            bucket = self._s.annotations.setdefault(annotation.workflow_run_id, [])
            if annotation.idempotency_key is not None and any(
                a.idempotency_key == annotation.idempotency_key for a in bucket
            ):
                raise DuplicateError(
                    f"annotation key {annotation.idempotency_key!r} already used on run "
                    f"{annotation.workflow_run_id!r}"
                )
            bucket.append(annotation)
            self._tx.on_rollback(functools.partial(_drop_last, bucket))

    async def find(self, run_id: str, idempotency_key: str) -> Annotation | None:
        stored: list[Annotation] = self._s.annotations.get(run_id, [])
        return next((a for a in stored if a.idempotency_key == idempotency_key), None)

    async def for_run(
        self,
        run_id: str,
        *,
        key: str | None = None,
        key_prefix: str | None = None,
        scope: str | None = None,
        limit: int = 100,
    ) -> list[Annotation]:
        out = []
        for annotation in self._s.annotations.get(run_id, []):
            if key is not None and key not in annotation.attributes:
                continue
            if key_prefix is not None and not any(
                k.startswith(key_prefix) for k in annotation.attributes
            ):
                continue
            if scope is not None and annotation.scope != scope:
                continue
            out.append(annotation)
        return out[:limit]
