"""Rich renderings of runs, stages and events: the ``runs`` tables, the stage timeline
of ``runs show``, event lines for ``events``, and value truncation.

Pure functions from kernel models to Rich renderables, so every command draws the
same run the same way and tests can render without a terminal.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from textwrap import indent
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from treadle.kernel.ai import AICall, AICostRow
from treadle.kernel.events import EventBase
from treadle.kernel.model import Run, RunStatus, StageStatus
from treadle.kernel.schedules import FIRE_TIME_ATTRIBUTE, SCHEDULE_ATTRIBUTE
from treadle.kernel.workflows.model import JournalEntry, JournalStatus, Timer

STATUS_STYLES = {
    "PENDING": "dim",
    "RUNNING": "cyan",
    "SUSPENDED": "magenta",
    "COMPLETED": "green",
    "FAILED": "bold red",
    "CANCELLED": "yellow",
    "SKIPPED": "dim",
    "WAITING": "magenta",
    "RETRYING": "yellow",
}

TIMELINE_WIDTH = 24


def truncate(value: Any, limit: int = 80) -> str:
    """``value`` as compact JSON, cut to ``limit`` characters with an ellipsis."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def status_text(status: RunStatus | StageStatus | str) -> Text:
    name = str(getattr(status, "value", status))
    return Text(name, style=STATUS_STYLES.get(name, ""))


def run_status_text(run: Run) -> Text:
    """A run's status, with ``(paused)`` while ``run.pause`` holds it and
    ``(terminated)`` for a run ``run.terminate`` ended."""
    text = status_text(run.status)
    if run.paused and not run.status.terminal:
        text.append(" (paused)", style="yellow")
    elif run.terminated:
        text.append(" (terminated)")
    return text


def fmt_time(value: datetime | None) -> str:
    """UTC ``YYYY-MM-DD HH:MM:SS`` (stored times are UTC-aware)."""
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def fmt_duration(value: timedelta | float | None) -> str:
    if value is None:
        return "-"
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def elapsed(start: datetime | None, end: datetime | None) -> timedelta | None:
    return end - start if start is not None and end is not None else None


def runs_table(runs: Sequence[Run]) -> Table:
    """One row per run, newest first as ``Engine.list`` returns them."""
    table = Table(title=f"{len(runs)} run(s)", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("run id", no_wrap=True, min_width=36)
    table.add_column("workflow", overflow="fold")
    table.add_column("status", no_wrap=True, min_width=9)
    table.add_column("prio", justify="right", no_wrap=True)
    table.add_column("created (UTC)", no_wrap=True, min_width=19)
    table.add_column("took", justify="right", no_wrap=True)
    table.add_column("AI cost", justify="right", no_wrap=True)
    table.add_column("tokens", justify="right", no_wrap=True)
    table.add_column("error", overflow="fold", min_width=20)
    for run in runs:
        table.add_row(
            run.id,
            run.workflow_id,
            run_status_text(run),
            str(run.priority),
            fmt_time(run.created_at),
            fmt_duration(elapsed(run.started_at, run.completed_at)),
            fmt_cost(run.total_cost) if run.total_tokens or run.total_cost else "-",
            str(run.total_tokens) if run.total_tokens else "-",
            truncate(run.error, 60),
        )
    return table


def fmt_cost(value: Decimal | None, currency: str = "USD") -> str:
    """``$0.000123`` (six decimals under a cent, else four); ``-`` for no price."""
    if value is None:
        return "-"
    sign = "$" if currency == "USD" else f"{currency} "
    places = 6 if abs(value) < Decimal("0.01") else 4
    return f"{sign}{value:.{places}f}"


def ai_summary(run: Run) -> str:
    """``runs show``'s AI line: cost, tokens and the budget, if any."""
    text = f"{fmt_cost(run.total_cost)}, {run.total_tokens} tokens"
    if run.max_cost is not None:
        text += f" (budget {fmt_cost(run.max_cost)})"
    return text


def ai_calls_table(calls: Sequence[AICall]) -> Table:
    """One row per recorded AI call, in order; never the prompt or the response."""
    table = Table(title="AI calls", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("#", "stage / step", "try", "type", "model", "in", "out", "cost", "latency"):
        right = column in ("#", "try", "in", "out", "cost", "latency")
        table.add_column(column, no_wrap=True, justify="right" if right else "left")
    table.add_column("outcome", overflow="fold")
    for number, call in enumerate(calls, start=1):
        if call.error:
            outcome = Text(truncate(call.error, 60), style="red")
        elif call.failed_attempt:
            outcome = Text("attempt failed", style="yellow")
        else:
            outcome = Text("ok", style="green")
        table.add_row(
            str(number),
            call.step or call.stage_id or "-",
            str(call.attempt),
            call.call_type,
            call.model,
            str(call.input_tokens),
            str(call.output_tokens),
            fmt_cost(call.cost, call.currency),
            fmt_duration(call.latency),
            outcome,
        )
    return table


def costs_table(rows: Sequence[AICostRow], by: str) -> Table:
    """``treadle costs``: one row per group, most expensive first."""
    table = Table(title=f"AI costs by {by}", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column(by, overflow="fold")
    for column in ("calls", "failed", "in tokens", "out tokens", "cost"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(
            row.key,
            str(row.calls),
            str(row.failed_calls),
            str(row.input_tokens),
            str(row.output_tokens),
            fmt_cost(row.total_cost, row.currency),
        )
    total = sum((row.total_cost for row in rows), Decimal(0))
    table.caption = f"{sum(r.calls for r in rows)} calls, {fmt_cost(total)} in all"
    return table


def _bar(
    start: datetime | None, end: datetime | None, status: str, origin: datetime | None, span: float
) -> Text:
    """A stage's or step's place in the run: a bar from its start to its end (or start)."""
    if origin is None or start is None or span <= 0:
        return Text("")
    first = (start - origin).total_seconds() / span
    last = ((end or start) - origin).total_seconds() / span
    lo = min(max(int(first * TIMELINE_WIDTH), 0), TIMELINE_WIDTH - 1)
    hi = min(max(int(last * TIMELINE_WIDTH), lo + 1), TIMELINE_WIDTH)
    style = STATUS_STYLES.get(status, "")
    return Text(" " * lo + "█" * (hi - lo) + " " * (TIMELINE_WIDTH - hi), style=style)


def _span(
    run: Run, intervals: Sequence[tuple[datetime | None, datetime | None]] = ()
) -> tuple[datetime | None, float]:
    """The timeline's origin and length in seconds: from the earliest of the run's start
    and every stage's (or journal entry's) start to the latest end.

    The origin is the earliest start, not ``run.started_at`` alone: a rerun restarts the
    run's clock while the stages it kept started before, and a negative offset
    (``+-109108ms``) says nothing."""
    spans = [(s.started_at, s.completed_at) for s in run.stages] + list(intervals)
    starts = [start for start, _ in spans if start is not None]
    ends = [end or start for start, end in spans if start is not None]
    candidates = [*starts, *([run.started_at] if run.started_at is not None else [])]
    if not candidates:
        return None, 0.0
    origin = min(candidates)
    finish = max([*ends, run.completed_at or origin])
    return origin, max((finish - origin).total_seconds(), 1e-6)


def _offset(start: datetime | None, origin: datetime | None) -> str:
    return f"+{fmt_duration(start - origin)}" if origin is not None and start is not None else "-"


def stage_timeline(run: Run, *, width: int = 60) -> Table:
    """The stages in execution order with status, attempts, times and a timeline bar."""
    origin, span = _span(run)
    table = Table(title="stages", title_justify="left")
    table.add_column("grp", justify="right")
    table.add_column("stage", no_wrap=True)
    table.add_column("status")
    table.add_column("att", justify="right")
    table.add_column("start", justify="right")
    table.add_column("took", justify="right")
    table.add_column("timeline", no_wrap=True)
    table.add_column("output / error", overflow="fold")
    for stage in run.stages:
        detail: Text | str = truncate(stage.output, width)
        if stage.error:
            detail = Text(truncate(stage.error, width), style="red")
        elif stage.status is StageStatus.SUSPENDED and stage.next_poll_at is not None:
            detail = f"next check {fmt_time(stage.next_poll_at)}"
        table.add_row(
            str(stage.execution_group),
            stage.stage_id,
            status_text(stage.status),
            str(stage.attempt),
            _offset(stage.started_at, origin),
            fmt_duration(elapsed(stage.started_at, stage.completed_at)),
            _bar(stage.started_at, stage.completed_at, stage.status.value, origin, span),
            detail,
        )
    return table


def _entry_label(entry: JournalEntry) -> str:
    """``charge-card``, ``charge-card#2``: a step by its own name; other calls by theirs
    (the journal key without its ``kind:`` prefix)."""
    name = entry.name.split(":", 1)[1] if entry.kind != "step" and ":" in entry.name else entry.name
    return f"{name}#{entry.occurrence}" if entry.occurrence > 1 else name


def _entry_detail(entry: JournalEntry, width: int) -> Text | str:
    if entry.error:
        return Text(truncate(entry.error, width), style="red")
    details = entry.input or {}
    if entry.status is JournalStatus.RETRYING and entry.until is not None:
        return f"next attempt {fmt_time(entry.until)}"
    if entry.status is JournalStatus.WAITING:
        if entry.kind == "review":
            return f"review id {details.get('review_id', '?')}"
        if entry.kind == "child":
            return f"child run {details.get('child_run_id', '?')}"
        if entry.until is not None:
            return f"until {fmt_time(entry.until)}"
        return ""
    return truncate(entry.result, width)


def step_durations(events: Sequence[EventBase]) -> dict[tuple[str, int], timedelta]:
    """How long each completed step ran, from its ``step:completed`` event: a journal
    entry is written when its step ends, so its own times give no duration."""
    found: dict[tuple[str, int], timedelta] = {}
    for event in events:
        duration = getattr(event, "duration", None)
        if getattr(event, "type", "") == "step:completed" and isinstance(duration, timedelta):
            found[(str(getattr(event, "step", "")), int(getattr(event, "occurrence", 1)))] = (
                duration
            )
    return found


def _entry_interval(
    entry: JournalEntry, durations: Mapping[tuple[str, int], timedelta]
) -> tuple[datetime, datetime | None]:
    """When a journal entry started and ended: a completed step from its duration, a wait
    from when the body reached it to when it was woken."""
    took = durations.get((entry.name, entry.occurrence))
    if entry.kind == "step" and took is not None and entry.completed_at is not None:
        return entry.completed_at - took, entry.completed_at
    end = entry.completed_at
    return entry.created_at, max(end, entry.created_at) if end is not None else None


def journal_table(
    run: Run,
    entries: Sequence[JournalEntry],
    *,
    width: int = 60,
    durations: Mapping[tuple[str, int], timedelta] | None = None,
) -> Table:
    """A code workflow's journal: each durable ``ctx`` call in the order the body reached
    it, with its status, attempts, start offset, duration and result or error."""
    intervals = [_entry_interval(e, durations or {}) for e in entries]
    origin, span = _span(run, intervals)
    table = Table(title="steps (journal)", title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("kind", no_wrap=True)
    table.add_column("step", no_wrap=True)
    table.add_column("status")
    table.add_column("att", justify="right")
    table.add_column("start", justify="right")
    table.add_column("took", justify="right")
    table.add_column("timeline", no_wrap=True)
    table.add_column("result / error", overflow="fold")
    for entry, (start, end) in zip(entries, intervals, strict=True):
        table.add_row(
            str(entry.position),
            entry.kind,
            _entry_label(entry),
            status_text(entry.status.value),
            str(entry.attempts) if entry.kind == "step" else "",
            _offset(start, origin),
            fmt_duration(elapsed(start, end)),
            _bar(start, end, entry.status.value, origin, span),
            _entry_detail(entry, width),
        )
    if not entries:
        table.caption = "no durable call yet"
    return table


def timers_table(timers: Sequence[Timer]) -> Table:
    """The run's live timers: what each wakes and when (UTC)."""
    table = Table(title="timers", title_justify="left")
    table.add_column("purpose", no_wrap=True)
    table.add_column("for", no_wrap=True)
    table.add_column("fires at (UTC)", no_wrap=True)
    for timer in timers:
        name = timer.name.split(":", 1)[-1]
        label = f"{name}#{timer.occurrence}" if timer.occurrence > 1 else name
        table.add_row(timer.purpose, label, fmt_time(timer.fire_at))
    return table


def attempts_table(events: Sequence[EventBase]) -> Table | None:
    """Every stage attempt, or code-workflow step attempt, that failed, from the run's
    events (``None`` if none did)."""
    failures = [e for e in events if getattr(e, "type", "") in ("stage:failed", "step:failed")]
    if not failures:
        return None
    table = Table(title="failed attempts", title_justify="left")
    table.add_column("stage / step", no_wrap=True)
    table.add_column("att", justify="right")
    table.add_column("at (UTC)", no_wrap=True)
    table.add_column("retry")
    table.add_column("error", overflow="fold")
    for event in failures:
        retry_at = getattr(event, "retry_at", None)
        retry = f"at {fmt_time(retry_at)}" if getattr(event, "will_retry", False) else "no"
        name = getattr(event, "stage_id", None) or getattr(event, "step", "")
        occurrence = getattr(event, "occurrence", 1)
        table.add_row(
            f"{name}#{occurrence}" if occurrence > 1 else str(name),
            str(getattr(event, "attempt", "")),
            fmt_time(event.timestamp),
            retry,
            Text(truncate(getattr(event, "error", ""), 100), style="red"),
        )
    return table


def run_detail(
    run: Run,
    events: Sequence[EventBase],
    *,
    width: int = 60,
    journal: Sequence[JournalEntry] | None = None,
    timers: Sequence[Timer] = (),
    ai_calls: Sequence[AICall] = (),
) -> RenderableType:
    """``runs show``: a header, the stage timeline (with ``journal``, a code workflow's:
    its steps and live timers instead), failed attempts, AI calls and the output."""
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column()
    header.add_row("run", run.id)
    header.add_row("workflow", f"{run.workflow_id} (version {run.workflow_version})")
    header.add_row("status", run_status_text(run))
    header.add_row("priority", str(run.priority))
    header.add_row("created", fmt_time(run.created_at))
    header.add_row("started", fmt_time(run.started_at))
    header.add_row("completed", fmt_time(run.completed_at))
    header.add_row("duration", fmt_duration(elapsed(run.started_at, run.completed_at)))
    if run.idempotency_key:
        header.add_row("idempotency key", run.idempotency_key)
    if run.continued_from:
        header.add_row("continued from", run.continued_from)
    if run.continued_as:  # COMPLETED without an output of its own: where the chain goes on
        header.add_row("continued as", f"{run.continued_as} (ctx.continue_as_new)")
    if run.concurrency_key:
        header.add_row("concurrency key", run.concurrency_key)
    scheduled = run.search_attributes.get(SCHEDULE_ATTRIBUTE)
    if scheduled is not None:
        fired = run.search_attributes.get(FIRE_TIME_ATTRIBUTE)
        header.add_row("schedule", f"schedule {scheduled}, fire time {fired}")
    header.add_row("input", truncate(run.input, width * 2))
    if run.output is not None:
        header.add_row("output", truncate(run.output, width * 2))
    if run.error:
        header.add_row("error", Text(truncate(run.error, width * 2), style="red"))
    if ai_calls or run.max_cost is not None:
        header.add_row("AI", ai_summary(run))
    parts: list[RenderableType] = [header]
    if journal is None:
        parts.append(stage_timeline(run, width=width))
    else:
        body = run.stages[0] if run.stages else None
        if body is not None:
            header.add_row("body", f"{body.status.value}, activation {body.attempt}")
        durations = step_durations(events)
        parts.append(journal_table(run, journal, width=width, durations=durations))
        if timers:
            parts.append(timers_table(timers))
    failed = attempts_table(events)
    if failed is not None:
        parts.append(failed)
    if ai_calls:
        parts.append(ai_calls_table(ai_calls))
    parts.extend(stage_tracebacks(run))
    return Group(*parts)


def stage_tracebacks(run: Run) -> list[RenderableType]:
    """Each stage's stored traceback (its last failed attempt's, user frames only), under
    a title naming the stage, in full: a traceback cut short hides the line to fix."""
    shown: list[RenderableType] = []
    for stage in run.stages:
        if stage.error_traceback:
            shown.append(Text(f"traceback of stage {stage.stage_id!r} (attempt {stage.attempt})"))
            shown.append(Text(indent(stage.error_traceback.rstrip(), "  "), style="red"))
    return shown


def event_line(event: EventBase) -> Text:
    """``#seq  time  type  fields`` for one event, its fields truncated."""
    data = event.model_dump(
        mode="json",
        exclude={"type", "workflow_run_id", "sequence", "timestamp", "causation_id", "traceback"},
        exclude_none=True,
    )
    kind = str(getattr(event, "type", type(event).__name__))
    style = "red" if kind.endswith(":failed") else "green" if kind.endswith(":completed") else ""
    line = Text(f"#{event.sequence:<4} {fmt_time(event.timestamp)}  ")
    line.append(f"{kind:<20}", style=style)
    fields = "  ".join(f"{key}={truncate(value, 60)}" for key, value in data.items())
    line.append(f" {fields}" if fields else "")
    trace = getattr(event, "traceback", None)
    if trace:  # a failure's traceback, in full, under its line
        line.append("\n" + indent(str(trace).rstrip(), "      "), style="red")
    return line
