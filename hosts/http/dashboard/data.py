"""What each dashboard page shows, read through the ``Engine`` facade.

Kept apart from the routes so a page's content can be tested without HTTP, and so the
routes stay a thin layer of parsing, templates and redirects.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from treadle.hosts.http.dashboard.charts import (
    Bucket,
    GanttRow,
    journal_rows,
    render_gantt,
    stage_rows,
    throughput_buckets,
)
from treadle.kernel.ai import AICall
from treadle.kernel.errors import NotSupportedError
from treadle.kernel.events import WorkflowSuspended
from treadle.kernel.model import Run, RunStatus, StageStatus
from treadle.kernel.workflows.model import JournalEntry, JournalStatus

if TYPE_CHECKING:
    from treadle.engine import Engine
    from treadle.kernel.events import EventBase, OutboxRecord
    from treadle.kernel.model import QueueInfo, WorkerInfo

__all__ = [
    "PendingReview",
    "RunPage",
    "is_code_workflow",
    "pending_reviews",
    "pretty",
    "queues_page",
    "run_page",
    "throughput",
]

THROUGHPUT_CAP = 10_000
"""Most runs the throughput chart reads for one hour; past it the chart says so."""


def pretty(value: Any) -> str:
    """A payload as indented JSON text. Plain text: the template escapes it."""
    try:
        return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def is_code_workflow(engine: Engine, run: Run) -> bool:
    """Whether ``run`` is a code workflow (its registered definition says so; an
    unregistered workflow counts as one when it has a journal, decided by the caller)."""
    registry = engine.kernel.deps.registry
    get = getattr(registry, "get_workflow", None)
    definition = get(run.workflow_id) if callable(get) else None
    return definition is not None and getattr(definition, "kind", "pipeline") == "code"


@dataclasses.dataclass(frozen=True)
class PendingReview:
    run_id: str
    workflow_id: str
    review_id: str
    review_type: str
    reviewers: list[str]
    artifact: Any
    requested_at: datetime
    timeout_at: datetime | None


def _reviews_of(run: Run, entries: list[JournalEntry]) -> list[PendingReview]:
    found = []
    for entry in entries:
        if entry.kind != "review" or entry.status is not JournalStatus.WAITING:
            continue
        details = entry.input or {}
        reviewers = details.get("reviewers")
        found.append(
            PendingReview(
                run_id=run.id,
                workflow_id=run.workflow_id,
                review_id=str(details.get("review_id") or ""),
                review_type=str(details.get("review_type") or "review"),
                reviewers=[str(r) for r in reviewers] if isinstance(reviewers, list) else [],
                artifact=details.get("artifact"),
                requested_at=entry.created_at,
                timeout_at=entry.until,
            )
        )
    return found


async def pending_reviews(engine: Engine, *, limit: int = 200) -> list[PendingReview]:
    """Reviews waiting for a decision: the open ``ctx.review`` calls of suspended code
    workflows (at most ``limit`` runs are looked at, newest first)."""
    out: list[PendingReview] = []
    for run in await engine.list(status=RunStatus.SUSPENDED, limit=limit):
        if not is_code_workflow(engine, run):
            continue
        out.extend(_reviews_of(run, await engine.journal(run.id)))
    return sorted(out, key=lambda r: r.requested_at)


@dataclasses.dataclass(frozen=True)
class RunPage:
    run: Run
    code: bool
    rows: list[GanttRow]
    gantt: str
    journal: list[JournalEntry]
    events: list[EventBase]
    reviews: list[PendingReview]
    tracebacks: dict[str, str]
    """Stage id (or step) to the traceback of its last failure."""
    rerunnable: list[str]
    """Stages ``rerun_from`` may start from (pipelines) or steps ``fork`` may (code)."""
    waiting_for: str | None = None
    """What a suspended run waits for, in words (its last ``workflow:suspended``)."""
    ai_calls: list[AICall] = dataclasses.field(default_factory=list)
    """The run's recorded AI calls (issue 17): model, tokens, cost; prompts are not shown."""


AI_CALLS_SHOWN = 200
"""The run page lists at most this many AI calls (the run's totals count them all)."""


async def run_page(engine: Engine, run_id: str, *, now: datetime) -> RunPage:
    """Everything the run page shows, in one pass over the engine."""
    # Events before the run: the page's live stream starts after the last event shown,
    # so the run read must be at least as new as those events (read the other way, a
    # run could show RUNNING beside its own workflow:suspended and never refresh).
    events = [event async for event in engine.events(run_id)]
    run = await engine.get_run(run_id)
    code = is_code_workflow(engine, run)
    journal: list[JournalEntry] = []
    if code:
        try:
            journal = await engine.journal(run_id)
        except NotSupportedError:
            code = False
    rows = journal_rows(journal, now) if code else stage_rows(run, events, now)
    tracebacks: dict[str, str] = {}
    for event in events:
        trace = getattr(event, "traceback", None)
        if isinstance(trace, str) and trace:
            where = getattr(event, "stage_id", None) or getattr(event, "type", "run")
            tracebacks[str(where)] = trace
    if code:
        rerunnable = [
            entry.name if entry.occurrence == 1 else f"{entry.name}#{entry.occurrence}"
            for entry in journal
            if entry.kind == "step"
        ]
    else:
        rerunnable = [
            s.stage_id
            for s in sorted(run.stages, key=lambda s: s.execution_group)
            if s.status is not StageStatus.PENDING
        ]
    return RunPage(
        run=run,
        code=code,
        rows=rows,
        gantt=render_gantt(rows, now=now, title=f"timeline of run {run.id}"),
        journal=journal,
        events=events,
        reviews=_reviews_of(run, journal) if code else [],
        tracebacks=tracebacks,
        rerunnable=rerunnable,
        waiting_for=_waiting_for(run, events),
        ai_calls=await engine.ai_calls(run_id, limit=AI_CALLS_SHOWN) if run.total_tokens else [],
    )


def _waiting_for(run: Run, events: list[EventBase]) -> str | None:
    if run.status is not RunStatus.SUSPENDED:
        return None
    for event in reversed(events):
        if isinstance(event, WorkflowSuspended):
            return event.waiting_for
    return None


async def throughput(
    engine: Engine, *, now: datetime, minutes: int = 60
) -> tuple[list[Bucket], bool]:
    """Runs completed and failed per minute over the last ``minutes``, and whether the
    read hit ``THROUGHPUT_CAP`` (then the oldest minutes are undercounted).

    A run that ended since then was last updated since then too, so ``updated_after``
    (indexed with the status) narrows the read; ``throughput_buckets`` then counts each
    run in the minute of its ``completed_at``."""
    since = now.replace(second=0, microsecond=0) - timedelta(minutes=minutes - 1)
    runs = await engine.list(
        status=[RunStatus.COMPLETED, RunStatus.FAILED],
        updated_after=since,
        limit=THROUGHPUT_CAP,
    )
    return throughput_buckets(runs, now=now, minutes=minutes), len(runs) >= THROUGHPUT_CAP


@dataclasses.dataclass(frozen=True)
class QueuesPage:
    queues: list[QueueInfo]
    workers: list[WorkerInfo]
    dead_letters: list[OutboxRecord]
    live_within: timedelta


async def queues_page(engine: Engine, *, dlq_limit: int = 100) -> QueuesPage:
    """Queue depths and workers (``engine.queues``), every registered worker with its
    last heartbeat, and the dead-lettered events, oldest first."""
    window = timedelta(seconds=60)
    queues = await engine.queues(live_within=window)
    registry = engine.backend.workers if engine.backend is not None else None
    workers = list(await registry.list_workers()) if registry is not None else []
    dead = await engine.outbox.dead_letters(dlq_limit)
    return QueuesPage(queues=queues, workers=workers, dead_letters=dead, live_within=window)
