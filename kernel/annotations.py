"""Annotations: provenance records on a run whose attributes are also its search
attributes (what ``Engine.list(attributes=...)`` filters on)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from treadle.kernel.events import AnnotationCreated
from treadle.kernel.handlers.basics import load_run
from treadle.kernel.limits import validate_attributes
from treadle.kernel.model import Annotation, JsonValue, evolve

if TYPE_CHECKING:
    from treadle.kernel.deps import Deps
    from treadle.ports import Transaction


async def attach_in_tx(
    deps: Deps,
    tx: Transaction,
    run_id: str,
    attributes: Mapping[str, JsonValue],
    *,
    actor: str | None = None,
    scope: str | None = None,
    stage_id: str | None = None,
    idempotency_key: str | None = None,
    causation_id: str | None = None,
) -> Annotation:
    validate_attributes(attributes)
    if idempotency_key is not None:
        existing = await tx.annotations.find(run_id, idempotency_key)
        if existing is not None:
            return existing
    run = await load_run(tx, run_id)
    now = deps.clock.now()
    annotation = Annotation(
        id=deps.ids.new_id(),
        workflow_run_id=run_id,
        attributes=dict(attributes),
        actor=actor,
        scope=scope,
        stage_id=stage_id,
        idempotency_key=idempotency_key,
        created_at=now,
    )
    await tx.annotations.insert_many([annotation])
    await tx.runs.update(
        evolve(run, {"search_attributes": {**run.search_attributes, **annotation.attributes}})
    )
    await tx.outbox.append(
        [
            AnnotationCreated(
                workflow_run_id=run_id,
                timestamp=now,
                causation_id=causation_id,
                annotation_id=annotation.id,
                attributes=annotation.attributes,
                actor=actor,
                scope=scope,
                stage_id=stage_id,
            )
        ]
    )
    return annotation


class Annotations:
    """``kernel.annotations.attach(...)`` / ``.list(...)``."""

    def __init__(self, deps: Deps) -> None:
        self._deps = deps

    async def attach(
        self,
        run_id: str,
        attributes: Mapping[str, JsonValue],
        *,
        actor: str | None = None,
        scope: str | None = None,
        idempotency_key: str | None = None,
    ) -> Annotation:
        """Attach in one transaction; a repeated ``idempotency_key`` returns the first."""
        validate_attributes(attributes)
        async with self._deps.persistence.transaction() as tx:
            return await attach_in_tx(
                self._deps,
                tx,
                run_id,
                attributes,
                actor=actor,
                scope=scope,
                idempotency_key=idempotency_key,
            )

    async def list(
        self,
        run_id: str,
        *,
        key: str | None = None,
        key_prefix: str | None = None,
        scope: str | None = None,
        limit: int = 100,
    ) -> list[Annotation]:
        async with self._deps.persistence.transaction() as tx:
            return await tx.annotations.for_run(
                run_id, key=key, key_prefix=key_prefix, scope=scope, limit=limit
            )
