"""The dashboard's SVG charts (hosts/http/dashboard/charts.py): pure functions of a run,
its events or journal, and ``now``."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

import pytest

pytest.importorskip("fastapi", reason="the dashboard needs the server extra")

from treadle.hosts.http.dashboard.charts import (
    GanttRow,
    Segment,
    journal_rows,
    render_gantt,
    render_throughput,
    stage_rows,
    throughput_buckets,
)
from treadle.kernel.events import (
    EventBase,
    StageCompleted,
    StageFailed,
    StageStarted,
    StageSuspended,
)
from treadle.kernel.model import Run, RunStatus, StageRun, StageStatus
from treadle.kernel.workflows.model import JournalEntry, JournalStatus

T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
SVG = "{http://www.w3.org/2000/svg}"


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _run(stages: list[StageRun], status: RunStatus = RunStatus.RUNNING) -> Run:
    return Run(
        id="r1",
        workflow_id="wf",
        status=status,
        created_at=T0,
        updated_at=T0,
        stages=stages,
    )


def _stage(stage_id: str, group: int, status: StageStatus, **fields: object) -> StageRun:
    return StageRun(
        workflow_run_id="r1",
        stage_id=stage_id,
        execution_group=group,
        status=status,
        **fields,  # type: ignore[arg-type]
    )


def _events() -> list[EventBase]:
    seq = iter(range(1, 100))

    def e(cls: type[EventBase], t: float, **fields: object) -> EventBase:
        return cls(workflow_run_id="r1", sequence=next(seq), timestamp=at(t), **fields)

    return [
        # group 0: "fetch" fails once, waits for its retry, then succeeds
        e(StageStarted, 0, stage_id="fetch", attempt=1),
        e(StageFailed, 1, stage_id="fetch", attempt=1, error="timeout", will_retry=True),
        e(StageStarted, 3, stage_id="fetch", attempt=2),
        e(StageCompleted, 4, stage_id="fetch", attempt=2),
        # group 1: "batch" suspends and is resumed by a poll; "score" runs in parallel
        e(StageStarted, 4, stage_id="batch", attempt=1),
        e(StageStarted, 4, stage_id="score", attempt=1),
        e(StageSuspended, 5, stage_id="batch", next_poll_at=at(8)),
        e(StageCompleted, 6, stage_id="score", attempt=1),
        e(StageCompleted, 9, stage_id="batch", attempt=1),
    ]


def _pipeline() -> Run:
    return _run(
        [
            _stage("fetch", 0, StageStatus.COMPLETED, attempt=2, started_at=at(0)),
            _stage("batch", 1, StageStatus.COMPLETED, attempt=1, started_at=at(4)),
            _stage("score", 1, StageStatus.COMPLETED, attempt=1, started_at=at(4)),
            _stage("report", 2, StageStatus.PENDING),
        ]
    )


def test_stage_rows_show_attempts_retry_waits_and_suspensions() -> None:
    """Each stage is one lane in group order; a retried stage shows its failed attempt,
    the backoff and the attempt that succeeded; a batch stage shows its suspension."""
    rows = stage_rows(_pipeline(), _events(), now=at(10))
    assert [(r.label, r.group) for r in rows] == [
        ("fetch", 0),
        ("batch", 1),
        ("score", 1),
        ("report", 2),
    ]
    fetch, batch, score, report = rows
    assert [(s.kind, s.attempt, s.start, s.end) for s in fetch.segments] == [
        ("failed", 1, at(0), at(1)),
        ("retry-wait", None, at(1), at(3)),
        ("completed", 2, at(3), at(4)),
    ]
    assert [(s.kind, s.start, s.end) for s in batch.segments] == [
        ("running", at(4), at(5)),
        ("suspended", at(5), at(9)),
        ("completed", at(9), at(9)),  # the poll that found it done
    ]
    assert [s.kind for s in score.segments] == ["completed"]
    assert report.segments == ()


def test_an_attempt_in_flight_runs_until_now() -> None:
    """A stage that has started and not finished is drawn up to ``now``."""
    run = _run([_stage("slow", 0, StageStatus.RUNNING, attempt=1, started_at=at(0))])
    events = [
        StageStarted(workflow_run_id="r1", sequence=1, timestamp=at(0), stage_id="slow", attempt=1)
    ]
    (row,) = stage_rows(run, events, now=at(7))
    assert row.segments == (Segment(at(0), at(7), "running", 1),)


def test_stage_without_events_falls_back_to_its_stored_times() -> None:
    """With its events gone (purged), a stage still shows one bar from its own times."""
    run = _run(
        [_stage("s", 0, StageStatus.FAILED, attempt=3, started_at=at(1), completed_at=at(2))],
        status=RunStatus.FAILED,
    )
    (row,) = stage_rows(run, [], now=at(9))
    assert row.segments == (Segment(at(1), at(2), "failed", 3),)


def _rects(svg: str) -> list[ET.Element]:
    return ET.fromstring(svg).findall(f".//{SVG}rect")


def test_gantt_svg_draws_a_bar_per_segment_with_groups_and_tooltips() -> None:
    """The SVG parses, has one classed bar per segment, a separator between execution
    groups, and says how many attempts a retried stage took."""
    rows = stage_rows(_pipeline(), _events(), now=at(10))
    svg = render_gantt(rows, now=at(10), title="timeline of r1")
    kinds = [rect.get("class") for rect in _rects(svg)]
    assert kinds == [
        "seg seg-failed",
        "seg seg-retry-wait",
        "seg seg-completed",
        "seg seg-running",
        "seg seg-suspended",
        "seg seg-completed",
        "seg seg-completed",
    ]
    root = ET.fromstring(svg)
    groups = [line for line in root.iter(f"{SVG}line") if line.get("class") == "gantt-group"]
    assert len(groups) == 2  # between groups 0|1 and 1|2
    assert "fetch (2 attempts)" in "".join(root.itertext())
    tips = [t.text for t in root.iter(f"{SVG}title")]
    assert "fetch: failed, attempt 1, 1.0 s" in tips
    # bars sit in time order: the retry backoff starts where the failed attempt ends
    failed, backoff = _rects(svg)[:2]
    assert float(failed.get("x", "0")) + float(failed.get("width", "0")) == pytest.approx(
        float(backoff.get("x", "0")), abs=0.2
    )


def test_gantt_escapes_labels_from_user_code() -> None:
    """A step name or stage id with markup is text in the SVG, never an element."""
    evil = "<script>alert(1)</script>"
    row = GanttRow(evil, 0, "RUNNING", (Segment(at(0), at(1), "running"),))
    svg = render_gantt([row], now=at(1))
    assert "<script>" not in svg
    root = ET.fromstring(svg)
    assert not [el for el in root.iter() if el.tag.endswith("script")]
    assert evil in "".join(root.itertext())


def test_gantt_of_nothing_started_says_so() -> None:
    """A run whose stages have not started draws an empty chart with a note."""
    svg = render_gantt([GanttRow("a", 0, "PENDING", ())], now=at(0))
    assert "no stage has started" in svg
    ET.fromstring(svg)


def _entry(
    position: int, name: str, kind: str, status: JournalStatus, **fields: object
) -> JournalEntry:
    return JournalEntry(
        workflow_run_id="r1",
        position=position,
        name=name,
        occurrence=1,
        kind=kind,
        status=status,
        created_at=fields.pop("created_at", at(position)),  # type: ignore[arg-type]
        **fields,  # type: ignore[arg-type]
    )


def test_journal_rows_show_steps_and_waits_in_body_order() -> None:
    """A code workflow's chart has a lane per step or wait, in the order the body reached
    them; an open wait runs until now; instant calls (``now``) are left out."""
    entries = [
        _entry(0, "charge", "step", JournalStatus.COMPLETED, attempts=2, completed_at=at(2)),
        _entry(1, "now", "now", JournalStatus.COMPLETED, completed_at=at(1)),
        _entry(2, "retry-me", "step", JournalStatus.RETRYING, attempts=1),
        _entry(3, "signal:approval", "signal", JournalStatus.WAITING),
    ]
    rows = journal_rows(entries, now=at(10))
    assert [(r.label, r.segments[0].kind) for r in rows] == [
        ("step 'charge' #1", "completed"),
        ("step 'retry-me' #1", "retry-wait"),
        ("signal 'approval' #1", "waiting"),
    ]
    assert rows[0].attempts == 2
    assert rows[2].segments[0].end == at(10)


def _ended(run_id: str, status: RunStatus, when: datetime) -> Run:
    return Run(
        id=run_id,
        workflow_id="wf",
        status=status,
        created_at=when - timedelta(seconds=5),
        updated_at=when,
        completed_at=when,
    )


def test_throughput_counts_completed_and_failed_per_minute_of_the_last_hour() -> None:
    """Every one of the 60 minutes is present, oldest first; a run counts in the minute
    it ended; cancelled runs and runs older than the hour are not counted."""
    now = datetime(2026, 12, 7, 12, 30, 40, tzinfo=UTC)
    runs = [
        _ended("a", RunStatus.COMPLETED, now - timedelta(seconds=10)),  # 12:30
        _ended("b", RunStatus.COMPLETED, now - timedelta(seconds=30)),  # 12:30
        _ended("c", RunStatus.FAILED, now - timedelta(minutes=1)),  # 12:29
        _ended("d", RunStatus.CANCELLED, now - timedelta(minutes=1)),
        _ended("e", RunStatus.COMPLETED, now - timedelta(minutes=59)),  # 11:31, the first
        _ended("old", RunStatus.COMPLETED, now - timedelta(minutes=61)),
    ]
    buckets = throughput_buckets(runs, now=now)
    assert len(buckets) == 60
    assert buckets[0].start == datetime(2026, 12, 7, 11, 31, tzinfo=UTC)
    assert buckets[-1].start == datetime(2026, 12, 7, 12, 30, tzinfo=UTC)
    assert (buckets[-1].completed, buckets[-1].failed) == (2, 0)
    assert (buckets[-2].completed, buckets[-2].failed) == (0, 1)
    assert (buckets[0].completed, buckets[0].failed) == (1, 0)
    assert sum(b.completed + b.failed for b in buckets) == 4


def test_throughput_svg_stacks_failed_on_completed_scaled_to_the_peak() -> None:
    """One group per minute carrying its counts; the tallest minute fills the plot."""
    now = datetime(2026, 12, 7, 12, 0, 30, tzinfo=UTC)
    runs = [_ended(f"r{i}", RunStatus.COMPLETED, now) for i in range(3)]
    runs.append(_ended("f", RunStatus.FAILED, now))
    svg = render_throughput(throughput_buckets(runs, now=now), height=200)
    root = ET.fromstring(svg)
    minutes = [g for g in root.iter(f"{SVG}g") if g.get("class") == "minute"]
    assert len(minutes) == 60
    last = minutes[-1]
    assert (last.get("data-completed"), last.get("data-failed")) == ("3", "1")
    ok = next(r for r in last.iter(f"{SVG}rect") if r.get("class") == "bar-completed")
    bad = next(r for r in last.iter(f"{SVG}rect") if r.get("class") == "bar-failed")
    assert float(ok.get("height", "0")) == pytest.approx(3 * float(bad.get("height", "0")))
    assert re.search(r">4</text>", svg)  # the peak on the y axis
