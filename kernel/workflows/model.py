"""The stored shapes of code workflows: journal entries, inbox messages, timers.

A code workflow's durable state is its journal: one entry per durable ``ctx`` call
(a step, a sleep, a signal wait, ``now``, ``uuid``, ``publish``, a child run, a race's
decision), keyed by ``(name, occurrence)`` and ordered by ``position``, the order the
body reached them. Signals wait in an inbox until a ``wait_for_signal`` consumes them; sleeps,
wait timeouts and long retry backoffs are timers that the maintenance tick fires.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from treadle.kernel.model import JsonValue, RunStatus


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class JournalStatus(StrEnum):
    COMPLETED = "COMPLETED"
    """The call's outcome is recorded; replay returns it."""
    WAITING = "WAITING"
    """A sleep or signal wait the run is suspended on."""
    RETRYING = "RETRYING"
    """A step that failed and waits for its next attempt (``input["until"]``)."""
    FAILED = "FAILED"
    """A step whose retries are exhausted; replay raises ``StepFailedError`` again."""
    CANCELLED = "CANCELLED"
    """A branch that lost a ``ctx.race``: its outcome is discarded, its timer disarmed, and
    replay never runs it again."""


JournalKind = Literal[
    "step",
    "sleep",
    "signal",
    "update",
    "reply",
    "review",
    "now",
    "uuid",
    "publish",
    "attribute",
    "child",
    "race",
]


@dataclass(frozen=True, slots=True)
class JournalOwner:
    """What an activation knows it owns, as its first phase committed it: the run at
    ``run_version``, its orchestrating stage at ``stage_version``, the job leased to
    ``worker_id`` at ``job_attempts``. A journal commit that takes these from memory
    instead of reading them (``ports/persistence/journal.py``, ``append_journal``)
    writes only while all of them still hold."""

    run_id: str
    run_version: int
    stage_id: str
    stage_version: int
    job_id: str
    worker_id: str
    job_attempts: int


def journal_key(kind: str, name: str) -> str:
    """The stored name of a call: a step's own name; ``kind:name`` for the other calls, so
    a step named ``status`` and ``publish("status", ...)`` keep separate occurrences."""
    if kind == "step":
        return name
    return f"{kind}:{name}" if name else kind


class JournalEntry(_Frozen):
    """One durable boundary of one run (a row of the ``journal`` table)."""

    workflow_run_id: str
    position: int
    name: str
    """The journal key (see ``journal_key``)."""
    occurrence: int
    kind: str
    status: JournalStatus
    attempts: int = 0
    input: dict[str, JsonValue] | None = None
    """Wait bookkeeping: ``until`` (ISO time a sleep, timeout or retry is due),
    ``signal`` (the awaited signal name), ``child_run_id`` and ``workflow_id`` (a child)."""
    result: JsonValue = None
    error: str | None = None
    idempotency_key: str | None = None
    created_at: datetime
    completed_at: datetime | None = None
    version: int = 0
    id: int | None = None

    @property
    def until(self) -> datetime | None:
        raw = (self.input or {}).get("until")
        return datetime.fromisoformat(raw) if isinstance(raw, str) else None

    def describe(self) -> str:
        return describe_call(self.kind, self.name, self.occurrence)


def describe_call(kind: str, key: str, occurrence: int) -> str:
    """``step 'charge' #1``, ``sleep 'sleep' #2``: how errors name a journal position."""
    label = key.split(":", 1)[1] if kind != "step" and ":" in key else key
    return f"{kind} {label!r} #{occurrence}"


class InboxMessage(_Frozen):
    """A signal (or update) delivered to a run, consumed at most once in arrival order."""

    workflow_run_id: str
    kind: Literal["signal", "update"] = "signal"
    name: str
    payload: JsonValue = None
    update_id: str | None = None
    reply: JsonValue = None
    idempotency_key: str | None = None
    created_at: datetime
    consumed_at: datetime | None = None
    consumed_by: str | None = None
    """``name#occurrence`` of the journal entry that consumed it."""
    id: int | None = None


class Timer(_Frozen):
    """A durable wake-up for one journal entry: ``purpose`` is ``sleep``,
    ``signal_timeout`` or ``retry``. One live timer per (run, name, occurrence)."""

    workflow_run_id: str
    name: str
    occurrence: int
    purpose: str
    fire_at: datetime
    payload: JsonValue = None
    created_at: datetime
    fired_at: datetime | None = None
    id: int | None = None


@dataclass(frozen=True)
class ChildStart:
    """A child run to create in the same transaction as the parent's ``child`` entry."""

    run_id: str
    workflow_id: str
    input: JsonValue
    config: dict[str, JsonValue]


def entry_values(entry: JournalEntry) -> dict[str, Any]:
    """Field values of an entry (for adapters that store columns)."""
    return dict(entry.__dict__)


class ForkResult(BaseModel):
    """What ``fork`` created."""

    model_config = ConfigDict(frozen=True)

    workflow_run_id: str
    """The new run (PENDING; a worker claims it like any started run)."""
    forked_from: str
    """The source run."""
    from_step: str
    """The step the fork runs afresh from."""
    occurrence: int
    """Which occurrence of that step (1 for the first ``ctx.step(name, ...)``)."""
    copied_entries: int
    """Journal entries reused from the source."""
    status: RunStatus = RunStatus.PENDING
