"""Server-rendered SVG charts for the dashboard: a run's timeline as a Gantt chart and
the throughput of the last hour.

Pure functions: they take the run, its events or journal, and ``now`` as arguments and
return SVG text, so the same input always draws the same chart and the tests need no
server. Every label is escaped here (the SVG is inserted into the page as markup), since
stage ids, step names and error texts come from user code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from html import escape
from typing import Literal

from treadle.kernel.events import (
    EventBase,
    StageCompleted,
    StageFailed,
    StageStarted,
    StageSuspended,
)
from treadle.kernel.model import Run, RunStatus, StageStatus
from treadle.kernel.workflows.model import JournalEntry, JournalStatus

__all__ = [
    "Bucket",
    "GanttRow",
    "Segment",
    "journal_rows",
    "render_gantt",
    "render_throughput",
    "stage_rows",
    "throughput_buckets",
]

SegmentKind = Literal["running", "completed", "failed", "suspended", "retry-wait", "waiting"]
"""``running``: an attempt still in flight; ``completed`` / ``failed``: a finished
attempt; ``suspended``: a batch stage waiting for its next poll; ``retry-wait``: the
backoff between a failed attempt and the next; ``waiting``: a code workflow waiting on a
sleep, a signal, an update, a review or a child."""


@dataclasses.dataclass(frozen=True, slots=True)
class Segment:
    start: datetime
    end: datetime
    kind: SegmentKind
    attempt: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class GanttRow:
    """One line of the chart: a stage (or journal call) in its execution group."""

    label: str
    group: int
    status: str
    segments: tuple[Segment, ...]
    attempts: int = 0


def _stage_segments(events: Iterable[EventBase], now: datetime) -> dict[str, list[Segment]]:
    """Each stage's attempts, suspensions and retry waits, from its ``stage:*`` events."""
    out: dict[str, list[Segment]] = {}
    open_: dict[str, tuple[datetime, SegmentKind, int | None]] = {}

    def close(stage: str, at: datetime) -> None:
        if stage in open_:
            start, kind, attempt = open_.pop(stage)
            out.setdefault(stage, []).append(Segment(start, max(at, start), kind, attempt))

    for event in sorted(events, key=lambda e: e.sequence):
        if isinstance(event, StageStarted):
            close(event.stage_id, event.timestamp)
            open_[event.stage_id] = (event.timestamp, "running", event.attempt)
        elif isinstance(event, StageCompleted | StageFailed):
            stage = event.stage_id
            start, was, _ = open_.pop(stage, (event.timestamp, "running", None))
            kind: SegmentKind = "completed" if isinstance(event, StageCompleted) else "failed"
            if was == "suspended":  # a poll found it done: the wait, then the outcome mark
                out.setdefault(stage, []).append(Segment(start, event.timestamp, was))
                start = event.timestamp
            out.setdefault(stage, []).append(Segment(start, event.timestamp, kind, event.attempt))
            if isinstance(event, StageFailed) and event.will_retry:
                open_[stage] = (event.timestamp, "retry-wait", None)
        elif isinstance(event, StageSuspended):
            start, _, attempt = open_.pop(event.stage_id, (event.timestamp, "running", None))
            out.setdefault(event.stage_id, []).append(
                Segment(start, event.timestamp, "running", attempt)
            )
            open_[event.stage_id] = (event.timestamp, "suspended", None)
    for stage in list(open_):
        close(stage, now)
    return out


def stage_rows(run: Run, events: Iterable[EventBase], now: datetime) -> list[GanttRow]:
    """The rows of a pipeline run: one per stage, in group order.

    Attempts come from the run's events; a stage whose events are gone (purged, or
    recorded before this run's first event) still shows one bar from its stored times.
    A stage that has not started has no segment and is drawn as an empty lane.
    """
    by_stage = _stage_segments(events, now)
    rows = []
    for stage in sorted(run.stages, key=lambda s: (s.execution_group, s.stage_id)):
        segments = by_stage.get(stage.stage_id, [])
        if not segments and stage.started_at is not None:
            end = stage.completed_at or now
            kinds: dict[StageStatus, SegmentKind] = {
                StageStatus.COMPLETED: "completed",
                StageStatus.FAILED: "failed",
                StageStatus.SUSPENDED: "suspended",
            }
            kind = kinds.get(stage.status, "running")
            segments = [Segment(stage.started_at, end, kind, stage.attempt or None)]
        if stage.status in (StageStatus.CANCELLED, StageStatus.SKIPPED) or run.status.terminal:
            # A terminal stage has nothing in flight: cut an open bar where the run ended.
            stop = stage.completed_at or run.completed_at
            if stop is not None:
                segments = [dataclasses.replace(s, end=min(s.end, stop)) for s in segments]
        rows.append(
            GanttRow(
                label=stage.stage_id,
                group=stage.execution_group,
                status=stage.status.value,
                segments=tuple(segments),
                attempts=stage.attempt,
            )
        )
    return rows


_STEP_KINDS: dict[JournalStatus, SegmentKind] = {
    JournalStatus.COMPLETED: "completed",
    JournalStatus.FAILED: "failed",
    JournalStatus.RETRYING: "retry-wait",
    JournalStatus.CANCELLED: "failed",
}
_WAIT_KINDS = frozenset({"sleep", "signal", "update", "review", "child", "sleep_until"})


def journal_rows(entries: Sequence[JournalEntry], now: datetime) -> list[GanttRow]:
    """The rows of a code workflow: one per journaled ``ctx`` call, in the order the
    body reached them. Steps are attempts (``running`` / ``completed`` / ``failed``, a
    ``retry-wait`` while a retry is due); sleeps and waits for signals, updates, reviews
    and children are ``waiting``. Calls that take no time (``now``, ``uuid``) are left
    out: they would be zero-width bars."""
    rows = []
    for entry in sorted(entries, key=lambda e: e.position):
        if entry.kind == "step":
            kind = _STEP_KINDS.get(entry.status, "running")
        elif entry.kind in _WAIT_KINDS:
            kind = "waiting" if entry.status is JournalStatus.WAITING else "completed"
        else:
            continue
        end = entry.completed_at or now
        if entry.status is JournalStatus.CANCELLED and entry.completed_at is None:
            end = entry.created_at
        rows.append(
            GanttRow(
                label=entry.describe(),
                group=entry.position,
                status=entry.status.value,
                segments=(Segment(entry.created_at, max(end, entry.created_at), kind),),
                attempts=entry.attempts,
            )
        )
    return rows


_ROW_HEIGHT = 22
_LABEL_WIDTH = 220
_CHART_WIDTH = 640
_AXIS_HEIGHT = 24


def _duration_text(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render_gantt(rows: Sequence[GanttRow], *, now: datetime, title: str = "timeline") -> str:
    """An SVG Gantt chart of ``rows``: one lane per row, execution groups separated by a
    line, each segment a bar coloured by kind (``class="seg seg-<kind>"``) with a
    ``<title>`` tooltip (attempt, duration). Time runs from the first segment's start to
    the last one's end (or ``now`` for open ones)."""
    starts = [s.start for r in rows for s in r.segments]
    ends = [s.end for r in rows for s in r.segments]
    height = _AXIS_HEIGHT + max(len(rows), 1) * _ROW_HEIGHT + 4
    width = _LABEL_WIDTH + _CHART_WIDTH + 10
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="gantt" role="img" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        f"<title>{escape(title)}</title>",
    ]
    if not starts:
        parts.append(
            f'<text x="4" y="{_AXIS_HEIGHT + 14}" class="gantt-empty">no stage has started</text>'
        )
        parts.append("</svg>")
        return "".join(parts)
    t0 = min(starts)
    t1 = max(max(ends), t0 + timedelta(milliseconds=1))
    span = (t1 - t0).total_seconds()

    def x(at: datetime) -> float:
        return _LABEL_WIDTH + (at - t0).total_seconds() / span * _CHART_WIDTH

    for i in range(5):  # axis ticks: 0, 25, 50, 75, 100 % of the span
        tx = _LABEL_WIDTH + i * _CHART_WIDTH / 4
        parts.append(
            f'<line class="gantt-tick" x1="{tx:.1f}" y1="{_AXIS_HEIGHT - 6}" '
            f'x2="{tx:.1f}" y2="{height}"/>'
            f'<text class="gantt-axis" x="{tx:.1f}" y="{_AXIS_HEIGHT - 10}" '
            f'text-anchor="{"start" if i == 0 else "end" if i == 4 else "middle"}">'
            f"+{escape(_duration_text(span * i / 4))}</text>"
        )
    previous_group: int | None = None
    for index, row in enumerate(rows):
        y = _AXIS_HEIGHT + index * _ROW_HEIGHT
        if previous_group is not None and row.group != previous_group:
            parts.append(f'<line class="gantt-group" x1="0" y1="{y}" x2="{width}" y2="{y}"/>')
        previous_group = row.group
        attempts = f" ({row.attempts} attempts)" if row.attempts > 1 else ""
        parts.append(
            f'<g class="gantt-row" data-label="{escape(row.label)}" '
            f'data-status="{escape(row.status)}">'
            f'<text class="gantt-label" x="4" y="{y + 15}">'
            f"{escape(_clip(row.label, 30))}{attempts}"
            f"<title>{escape(row.label)}: {escape(row.status)}</title></text>"
        )
        for seg in row.segments:
            left = x(seg.start)
            bar = max(x(seg.end) - left, 2.0)
            tip = seg.kind + (f", attempt {seg.attempt}" if seg.attempt else "")
            tip += f", {_duration_text((seg.end - seg.start).total_seconds())}"
            parts.append(
                f'<rect class="seg seg-{seg.kind}" x="{left:.1f}" y="{y + 4}" '
                f'width="{bar:.1f}" height="{_ROW_HEIGHT - 8}" rx="2">'
                f"<title>{escape(row.label)}: {escape(tip)}</title></rect>"
            )
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclasses.dataclass(frozen=True, slots=True)
class Bucket:
    """Runs that ended in one minute: ``start`` is the minute, inclusive."""

    start: datetime
    completed: int = 0
    failed: int = 0


def throughput_buckets(runs: Iterable[Run], *, now: datetime, minutes: int = 60) -> list[Bucket]:
    """Runs completed and failed per minute over the ``minutes`` before ``now``, oldest
    first; every minute is present (zero when nothing ended). A run counts in the minute
    of its ``completed_at``; CANCELLED runs and runs still going are not counted."""
    end = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    start = end - timedelta(minutes=minutes)
    completed = [0] * minutes
    failed = [0] * minutes
    for run in runs:
        at = run.completed_at
        if at is None or not start <= at < end:
            continue
        slot = int((at - start).total_seconds() // 60)
        if run.status is RunStatus.COMPLETED:
            completed[slot] += 1
        elif run.status is RunStatus.FAILED:
            failed[slot] += 1
    return [Bucket(start + timedelta(minutes=i), completed[i], failed[i]) for i in range(minutes)]


def render_throughput(buckets: Sequence[Bucket], *, width: int = 720, height: int = 200) -> str:
    """A stacked bar chart of ``buckets``: completed (``class="bar-completed"``) under
    failed (``class="bar-failed"``) per minute, with the peak on the y axis and the
    first and last minute (UTC) on the x axis."""
    left, bottom, top = 36, 22, 10
    plot_w = width - left - 6
    plot_h = height - bottom - top
    peak = max((b.completed + b.failed for b in buckets), default=0)
    scale = plot_h / peak if peak else 0.0
    slot = plot_w / max(len(buckets), 1)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="throughput" role="img" '
        f'width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        "<title>runs completed and failed per minute</title>",
        f'<line class="axis" x1="{left}" y1="{top + plot_h}" x2="{width - 6}" '
        f'y2="{top + plot_h}"/>',
        f'<text class="axis-label" x="{left - 4}" y="{top + 8}" text-anchor="end">{peak}</text>',
        f'<text class="axis-label" x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text>',
    ]
    for i, b in enumerate(buckets):
        bx = left + i * slot + 1
        bw = max(slot - 2, 1)
        ok_h = b.completed * scale
        bad_h = b.failed * scale
        label = f"{b.start:%H:%M} UTC: {b.completed} completed, {b.failed} failed"
        parts.append(f'<g class="minute" data-completed="{b.completed}" data-failed="{b.failed}">')
        parts.append(f"<title>{escape(label)}</title>")
        if b.completed:
            parts.append(
                f'<rect class="bar-completed" x="{bx:.1f}" y="{top + plot_h - ok_h:.1f}" '
                f'width="{bw:.1f}" height="{ok_h:.1f}"/>'
            )
        if b.failed:
            parts.append(
                f'<rect class="bar-failed" x="{bx:.1f}" y="{top + plot_h - ok_h - bad_h:.1f}" '
                f'width="{bw:.1f}" height="{bad_h:.1f}"/>'
            )
        parts.append("</g>")
    if buckets:
        parts.append(
            f'<text class="axis-label" x="{left}" y="{height - 6}">'
            f"{buckets[0].start:%H:%M}</text>"
            f'<text class="axis-label" x="{width - 6}" y="{height - 6}" text-anchor="end">'
            f"{buckets[-1].start:%H:%M} UTC</text>"
        )
    parts.append("</svg>")
    return "".join(parts)
