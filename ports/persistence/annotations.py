"""The annotations concern of the Persistence port: what a run says about itself,
found by key, key prefix or scope (``ctx.annotate``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from treadle.kernel.model import Annotation


class AnnotationStore(Protocol):
    """Annotations, as seen by one unit of work (``tx.annotations``)."""

    async def insert_many(self, annotations: Sequence[Annotation]) -> None:
        """Insert the annotations; a repeated (run, idempotency key) is not stored twice."""

    async def find(self, run_id: str, idempotency_key: str) -> Annotation | None:
        """The run's annotation written with this idempotency key, if any."""

    async def for_run(
        self,
        run_id: str,
        *,
        key: str | None = None,
        key_prefix: str | None = None,
        scope: str | None = None,
        limit: int = 100,
    ) -> list[Annotation]:
        """The run's annotations, filtered by exact key, key prefix or scope."""
