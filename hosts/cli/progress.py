"""Live progress bars for runs: ``treadle start --wait`` and ``treadle demo``.

One bar per run, measured in stages (a running stage counts the fraction it last
reported with ``ctx.progress``), with a line saying what is happening now: which
stages run, which wait for their batch job's next poll, which are backing off before
a retry, and what a suspended code workflow waits for (a sleep, a signal, an update,
a review, a child run: the ``waiting_for`` of its latest ``workflow:suspended``).
It reads storage (the run and its new events) on a short poll, so it shows runs
that any process executes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from treadle.hosts.cli.common import fail
from treadle.hosts.cli.render import elapsed, fmt_duration, truncate
from treadle.kernel.model import Run, StageStatus
from treadle.kernel.workflows.definition import WORKFLOW_STAGE_ID

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

    from treadle.engine import Engine

_DONE = (StageStatus.COMPLETED, StageStatus.SKIPPED)
_MARKS = {"COMPLETED": ("✓", "green"), "FAILED": ("✗", "red"), "CANCELLED": ("-", "yellow")}


class OutcomeColumn(SpinnerColumn):
    """A spinner while the run is live, then ✓ / ✗ / - for how it ended."""

    def render(self, task: Task) -> RenderableType:
        outcome = task.fields.get("outcome")
        if outcome in _MARKS:
            mark, style = _MARKS[outcome]
            return Text(mark, style=style)
        return super().render(task)


@dataclass
class _Watch:
    run_id: str
    task: TaskID
    seen: int = 0
    fractions: dict[str, float] = field(default_factory=dict)
    retries: dict[str, int] = field(default_factory=dict)
    waiting_for: str | None = None
    """The latest ``workflow:suspended``'s reason (``None`` before one, or on old events)."""
    run: Run | None = None


def activity(
    run: Run,
    fractions: Mapping[str, float],
    retries: Mapping[str, int],
    waiting_for: str | None = None,
) -> str:
    """What the run is doing, in a few words, e.g. ``keywords retrying · translate batch
    poll at 12:05:00`` or ``waiting for signal approval``. ``waiting_for``: what the run's
    latest ``workflow:suspended`` said it waits for (a code workflow's sleep, signal...)."""
    if run.status.terminal:
        took = fmt_duration(elapsed(run.started_at, run.completed_at))
        suffix = f": {truncate(run.error, 60)}" if run.error else ""
        return f"{run.status.value} in {took}{suffix}"
    parts: list[str] = []
    for stage in run.stages:
        if stage.status is StageStatus.RUNNING:
            pct = fractions.get(stage.stage_id)
            parts.append(f"{stage.stage_id} running" + (f" {pct:.0%}" if pct else ""))
        elif stage.status is StageStatus.SUSPENDED and stage.stage_id == WORKFLOW_STAGE_ID:
            parts.append(f"waiting for {waiting_for}" if waiting_for else "waiting")
        elif stage.status is StageStatus.SUSPENDED:
            at = stage.next_poll_at
            when = f" at {at.strftime('%H:%M:%S')}" if at is not None else ""
            parts.append(f"{stage.stage_id} batch poll{when}")
        elif stage.status is StageStatus.PENDING and stage.error:
            parts.append(f"{stage.stage_id} retrying after attempt {stage.attempt} failed")
        elif stage.status is StageStatus.PENDING and stage.stage_id in retries:
            parts.append(f"{stage.stage_id} retrying")
    return " · ".join(parts) or run.status.value.lower()


def _completed(run: Run, fractions: Mapping[str, float]) -> float:
    done = sum(1 for s in run.stages if s.status in _DONE)
    running = sum(
        fractions.get(s.stage_id, 0.0) for s in run.stages if s.status is StageStatus.RUNNING
    )
    return done + min(running, 0.99 * len(run.stages))


async def _refresh(engine: Engine, watch: _Watch, progress: Progress) -> Run:
    run = await engine.get_run(watch.run_id)
    for event in await engine.kernel.reads.events(watch.run_id, watch.seen):
        watch.seen = max(watch.seen, event.sequence)
        kind = getattr(event, "type", "")
        stage_id = str(getattr(event, "stage_id", ""))
        if kind == "stage:progress":
            watch.fractions[stage_id] = float(getattr(event, "fraction", 0.0))
        elif kind == "stage:failed" and getattr(event, "will_retry", False):
            watch.retries[stage_id] = watch.retries.get(stage_id, 0) + 1
        elif kind == "stage:started":
            watch.fractions.pop(stage_id, None)
        elif kind == "workflow:suspended":
            watch.waiting_for = getattr(event, "waiting_for", None)
    progress.update(
        watch.task,
        total=max(len(run.stages), 1),
        completed=_completed(run, watch.fractions),
        activity=activity(run, watch.fractions, watch.retries, watch.waiting_for),
        outcome=run.status.value if run.status.terminal else None,
    )
    watch.run = run
    return run


async def watch_runs(
    engine: Engine,
    run_ids: Sequence[str],
    console: Console,
    *,
    labels: Mapping[str, str] | None = None,
    poll_interval: float = 0.1,
    max_wait: float | None = None,
) -> list[Run]:
    """Draw a bar per run until every run is terminal; returns the final runs.

    Past ``max_wait`` seconds it stops with an error naming the unfinished runs (they
    keep going: a worker owns them, not this view)."""
    progress = Progress(
        OutcomeColumn(),
        TextColumn("{task.description}", markup=False),
        BarColumn(bar_width=24),
        TextColumn("{task.completed:>4.3g}/{task.total:g} stages"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[activity]}", markup=False),
        console=console,
        refresh_per_second=10,
    )
    deadline = None if max_wait is None else time.monotonic() + max_wait
    with progress:
        watches = [
            _Watch(
                run_id,
                progress.add_task(
                    (labels or {}).get(run_id, run_id), total=1, activity="", outcome=None
                ),
            )
            for run_id in run_ids
        ]
        pending = list(watches)
        while pending:
            for watch in list(pending):
                run = await _refresh(engine, watch, progress)
                if run.status.terminal:
                    progress.stop_task(watch.task)
                    pending.remove(watch)
            if not pending:
                break
            if deadline is not None and time.monotonic() >= deadline:
                left = ", ".join(w.run_id for w in pending)
                fail(f"timed out after {max_wait:g}s waiting for run(s) {left} (still running)")
            await asyncio.sleep(poll_interval)
    return [w.run for w in watches if w.run is not None]
