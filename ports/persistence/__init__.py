"""The Persistence port: every durable read and write, inside ``transaction()``.

A ``Transaction`` is a unit of work: everything done through it commits together or
not at all (the in-memory adapter really rolls back). It exposes one narrow store per
concern, all sharing that unit of work::

    async with persistence.transaction() as tx:
        run = await tx.runs.get(run_id, for_update=True)
        await tx.stages.update(stage)
        await tx.outbox.append(events)

Each concern is its own ``typing.Protocol`` in its own module (``runs``, ``stages``,
``outbox``, ``idempotency``, ``annotations``, ``logs``, ``journal``, ``inbox``,
``timers``), so an adapter implements and a test fakes only the concerns it needs, and
a new port method touches one Protocol and one adapter module per backend. The job
transport takes the same transaction, so a state change and the job it creates commit
together.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import Protocol

from treadle.ports.ai_calls import AICallLogger
from treadle.ports.flow_control import FlowControl
from treadle.ports.persistence.annotations import AnnotationStore
from treadle.ports.persistence.idempotency import IdempotencyStore
from treadle.ports.persistence.inbox import InboxStore
from treadle.ports.persistence.journal import JournalStore
from treadle.ports.persistence.logs import LogStore
from treadle.ports.persistence.outbox import OutboxStore
from treadle.ports.persistence.runs import RunStore
from treadle.ports.persistence.stages import StageStore
from treadle.ports.persistence.timers import TimerStore
from treadle.ports.retention import RetentionStore
from treadle.ports.schedules import ScheduleStore

__all__ = [
    "AnnotationStore",
    "IdempotencyStore",
    "InboxStore",
    "JournalStore",
    "LogStore",
    "OutboxStore",
    "Persistence",
    "RunStore",
    "StageStore",
    "TimerStore",
    "Transaction",
]


class Transaction(Protocol):
    """One unit of work: a store per concern, visible only to it until it commits.

    Read-only attributes (``@property`` in the Protocol) so an adapter may implement
    them as plain attributes set in ``__init__`` or as properties.
    """

    @property
    def runs(self) -> RunStore:
        """Workflow runs (pipelines and code workflows)."""

    @property
    def stages(self) -> StageStore:
        """Stage rows of pipeline runs."""

    @property
    def outbox(self) -> OutboxStore:
        """Events, appended with the state change they describe."""

    @property
    def idempotency(self) -> IdempotencyStore:
        """Per-command idempotency records."""

    @property
    def annotations(self) -> AnnotationStore:
        """Annotations a run writes about itself."""

    @property
    def logs(self) -> LogStore:
        """Stage log lines."""

    @property
    def journal(self) -> JournalStore:
        """Code workflows' journals of recorded steps."""

    @property
    def inbox(self) -> InboxStore:
        """Code workflows' signals and updates."""

    @property
    def timers(self) -> TimerStore:
        """Code workflows' durable timers."""

    @property
    def flow(self) -> FlowControl:
        """Concurrency and rate-limit accounting (``ports.flow_control``)."""

    @property
    def retention(self) -> RetentionStore:
        """Purging expired runs (``ports/retention.py``), in this unit of work."""

    @property
    def schedules(self) -> ScheduleStore:
        """Cron schedules (``ports/schedules.py``), in this unit of work."""

    @property
    def ai_calls(self) -> AICallLogger:
        """Recorded AI calls and run totals (``ports/ai_calls.py``), in this unit of work."""


class Persistence(Protocol):
    """Opens units of work. Adapters translate driver errors to ``TreadleError``s."""

    def transaction(self) -> AbstractAsyncContextManager[Transaction]:
        """``async with persistence.transaction() as tx:`` commits on exit, rolls back on error."""
        ...

    async def aclose(self) -> None: ...
