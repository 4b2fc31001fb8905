"""Cron fire times across DST in the schedule's timezone (``CroniterCalendar``), the
catch-up plan, and ``TestEngine.advance_time`` firing a day of scheduled runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from treadle import WorkflowBuilder, WorkflowContext, define_schedule, define_stage, workflow
from treadle.adapters.cron import CroniterCalendar
from treadle.kernel.errors import DefinitionError
from treadle.testing import TestEngine

NY = "America/New_York"
CAL = CroniterCalendar()


def _fires(expression: str, start: datetime, count: int, tz: str = NY) -> list[str]:
    out, t = [], start
    for _ in range(count):
        nxt = CAL.next_after(expression, tz, t)
        assert nxt is not None
        out.append(nxt.strftime("%m-%d %H:%M"))
        t = nxt
    return out


def test_spring_forward_a_missing_wall_time_fires_once_shifted() -> None:
    """02:30 does not exist on 8 March 2026 in New York: the daily run fires once, at
    03:30 EDT (07:30 UTC), and at 02:30 EDT on the days around it."""
    start = datetime(2026, 3, 7, 12, tzinfo=UTC)
    assert _fires("30 2 * * *", start, 3) == ["03-08 07:30", "03-09 06:30", "03-10 06:30"]


def test_spring_forward_hourly_skips_the_missing_hour() -> None:
    """An hourly schedule has one hour fewer that night, none fired twice."""
    start = datetime(2026, 3, 8, 5, 30, tzinfo=UTC)  # 00:30 EST
    assert _fires("0 * * * *", start, 3) == ["03-08 06:00", "03-08 07:00", "03-08 08:00"]


def test_fall_back_a_repeated_wall_time_fires_once() -> None:
    """01:30 occurs twice on 1 November 2026: the daily run fires once, at the first."""
    start = datetime(2026, 10, 31, 12, tzinfo=UTC)
    assert _fires("30 1 * * *", start, 2) == ["11-01 05:30", "11-02 06:30"]


def test_fall_back_hourly_fires_in_both_repeated_hours() -> None:
    """An hourly schedule fires every real hour, both 01:00 EDT and 01:00 EST."""
    start = datetime(2026, 11, 1, 4, 30, tzinfo=UTC)  # 00:30 EDT
    assert _fires("0 * * * *", start, 3) == ["11-01 05:00", "11-01 06:00", "11-01 07:00"]
    before = datetime(2026, 11, 1, 7, 30, tzinfo=UTC)
    assert CAL.previous_before("0 * * * *", NY, before) == datetime(2026, 11, 1, 7, tzinfo=UTC)
    assert CAL.previous_before("0 * * * *", NY, datetime(2026, 11, 1, 6, tzinfo=UTC)) == (
        datetime(2026, 11, 1, 5, tzinfo=UTC)
    )


@pytest.mark.parametrize(
    ("expression", "tz", "problem"),
    [
        ("*/5 * * *", "UTC", "not valid"),
        ("0 0 30 2 *", "UTC", "never fires"),
        ("0 * * * *", "Mars/Base", "timezone"),
    ],
)
def test_unusable_expressions_are_refused(expression: str, tz: str, problem: str) -> None:
    """A wrong field count, an expression that never fires, an unknown timezone."""
    with pytest.raises(ValueError, match=problem):
        CAL.check(expression, tz)


def test_define_schedule_checks_its_fields() -> None:
    """A bad policy is a DefinitionError naming the schedule's workflow."""
    with pytest.raises(DefinitionError, match="catchup"):
        define_schedule("wf", cron="* * * * *", catchup="some")  # type: ignore[arg-type]


@workflow(id="hourly", input=None, schedule="0 * * * *")
async def hourly(ctx: WorkflowContext, _: None) -> str:
    return "ok"


@define_stage(id="noop", input="none", output=dict)
async def noop(ctx: object) -> dict[str, int]:
    return {}


async def test_advance_time_fires_a_day_of_runs() -> None:
    """``TestEngine.advance_time(days=1)`` fires 24 hourly runs and the pipeline's
    schedule (declared with ``WorkflowBuilder(schedule=...)``) every 6 hours, each run
    completed at its fire time."""
    pipeline = WorkflowBuilder("sweep", input=None, schedule="0 */6 * * *").pipe(noop).build()
    te = TestEngine([hourly, pipeline], start=datetime(2026, 1, 1, tzinfo=UTC))
    await te.advance_time(timedelta(days=1))
    runs = await te.kernel.reads.list_runs()
    by_workflow = {wf: [r for r in runs if r.workflow_id == wf] for wf in ("hourly", "sweep")}
    assert len(by_workflow["hourly"]) == 24
    assert len(by_workflow["sweep"]) == 4
    assert all(r.status.value == "COMPLETED" for r in runs)
    for run in runs:
        assert run.created_at.isoformat() == run.search_attributes["treadle.fire_time"]


async def test_advance_time_passes_a_schedule_that_cannot_fire() -> None:
    """A schedule whose workflow this engine lacks is logged and left due; advance_time
    moves on instead of stopping at its fire time forever."""
    te = TestEngine([hourly], start=datetime(2026, 1, 1, tzinfo=UTC))
    await te.run_until_idle()
    te.registry.unregister("hourly")
    await te.advance_time(timedelta(hours=3))
    assert await te.kernel.reads.list_runs() == []
    assert (await te.schedules.get("hourly")).next_fire_at == datetime(2026, 1, 1, 1, tzinfo=UTC)
