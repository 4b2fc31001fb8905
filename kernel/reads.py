"""The kernel's read side: ``kernel.reads``.

Commands change state through ``Kernel.dispatch``; these methods only read it, each in
one short transaction of the persistence port, and never wake or change a run. They are
kept apart from the dispatcher so that the ``Kernel`` stays what its name says (commands
in, results out) and a host that only reads (the CLI's ``runs show``, the HTTP API, the
dashboard) needs nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from treadle.kernel.ai import AICall, AICostRow, AIGroupBy, with_ai_totals
from treadle.kernel.errors import RunNotFoundError
from treadle.kernel.events import EventBase
from treadle.kernel.handlers.workflows import query, update_reply_in
from treadle.kernel.model import JsonValue, Run, RunFilter, evolve
from treadle.kernel.workflows.model import InboxMessage, JournalEntry

if TYPE_CHECKING:
    from datetime import datetime

    from treadle.kernel.deps import Deps
    from treadle.ports.persistence import Transaction


class Reads:
    """Queries against the kernel's ports (``kernel.reads``); see the module docstring."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps

    async def get_run(self, run_id: str, *, with_stages: bool = True) -> Run:
        """The run with its stages; ``RunNotFoundError`` if there is none."""
        async with self.deps.persistence.transaction() as tx:
            run = await tx.runs.get(run_id)
            if run is None:
                raise RunNotFoundError(f"no run with id {run_id!r}")
            if with_stages:
                run = evolve(run, {"stages": await tx.stages.for_run(run_id)})
            [run] = await with_ai_totals(tx, [run])
        return run

    async def list_runs(self, filter: RunFilter | None = None) -> list[Run]:
        async with self.deps.persistence.transaction() as tx:
            return await with_ai_totals(tx, await tx.runs.query(filter or RunFilter()))

    async def ai_calls(self, run_id: str, *, limit: int = 1000) -> list[AICall]:
        """The run's recorded AI calls, in the order they were recorded (``kernel/ai.py``)."""
        async with self.deps.persistence.transaction() as tx:
            await self._existing(tx, run_id)
            return await tx.ai_calls.for_run(run_id, limit=limit)

    async def ai_costs(
        self,
        by: AIGroupBy,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        workflow_id: str | None = None,
        limit: int = 1000,
    ) -> list[AICostRow]:
        """AI calls made in ``[since, until)`` grouped by workflow, model, UTC day or run."""
        async with self.deps.persistence.transaction() as tx:
            return await tx.ai_calls.aggregate(
                by, since=since, until=until, workflow_id=workflow_id, limit=limit
            )

    async def events(self, run_id: str, after_sequence: int = 0) -> list[EventBase]:
        async with self.deps.persistence.transaction() as tx:
            return await tx.outbox.events_for_run(run_id, after_sequence)

    # -- code workflows -------------------------------------------------------------------
    async def query(self, run_id: str, key: str) -> JsonValue:
        """What a code workflow last published under ``key`` (``None`` if nothing yet).
        Read-only: it never wakes or changes the run."""
        return await query(self.deps, run_id, key)

    async def update_reply(self, run_id: str, update_id: str) -> tuple[bool, JsonValue]:
        """``(answered, reply)`` of an update sent with ``run.update``."""
        async with self.deps.persistence.transaction() as tx:
            await self._existing(tx, run_id)
            return await update_reply_in(tx, run_id, update_id)

    async def journal(self, run_id: str) -> list[JournalEntry]:
        """A code workflow run's journal, in the order its body reached each call."""
        async with self.deps.persistence.transaction() as tx:
            await self._existing(tx, run_id)
            return await tx.journal.entries(run_id)

    async def inbox(self, run_id: str) -> list[InboxMessage]:
        """The signals delivered to a run, in arrival order, consumed or not."""
        async with self.deps.persistence.transaction() as tx:
            await self._existing(tx, run_id)
            return await tx.inbox.for_run(run_id)

    @staticmethod
    async def _existing(tx: Transaction, run_id: str) -> None:
        if await tx.runs.get(run_id) is None:
            raise RunNotFoundError(f"no run with id {run_id!r}")
